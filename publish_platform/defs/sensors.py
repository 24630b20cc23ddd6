"""The landing sensor: one dynamic partition and one run per ready workflow run."""

import json
from datetime import UTC, datetime

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster_aws.s3 import S3Resource

from publish_platform.config import load_settings
from publish_platform.defs.jobs import publish_batch
from publish_platform.defs.partitions import workflow_runs
from publish_platform.defs.resources import PlatformResource
from publish_platform.landing import RunListing, discover
from publish_platform.ordering import cached_profile

MAX_REJECTED_REMEMBERED = 1000


def run_request_for(listing: RunListing) -> RunRequest:
    key = listing.run.partition_key
    # One run per partition, ever, from this sensor: re-evaluations cannot launch twice. The
    # source and priority tags come from the job's partitioned config, as for every launch.
    return RunRequest(partition_key=key, run_key=key)


def _data_age_key(listing: RunListing) -> tuple[datetime, str]:
    try:
        timestamp = cached_profile(listing.run.partition_key).source_timestamp
    except Exception:  # noqa: BLE001 - ordering is best effort; the run is requested anyway
        timestamp = None
    return (
        timestamp or listing.last_modified or datetime.max.replace(tzinfo=UTC),
        listing.run.partition_key,
    )


@sensor(
    job=publish_batch,
    minimum_interval_seconds=load_settings().sensor_interval_seconds,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches the landing prefix; adds a partition and requests a run per ready run.",
)
def landing_sensor(
    context: SensorEvaluationContext, s3: S3Resource, platform: PlatformResource
) -> SensorResult | SkipReason:
    settings = platform.settings()
    # The cursor remembers run folders already reported as unusable, so each is logged once;
    # the record of what was picked up is the set of partitions itself.
    cursor = json.loads(context.cursor) if context.cursor else {}
    rejected_before = set(cursor.get("rejected", []))
    known = set(context.instance.get_dynamic_partitions(workflow_runs.name))
    found = discover(s3.get_client(), settings.landing_location, known, settings.settle_seconds)
    for reason in found.rejected:
        if reason not in rejected_before:
            context.log.error(f"run folder ignored: {reason}")
    for key, reason in found.waiting.items():
        context.log.debug(f"{key} not ready: {reason}")
    new_cursor = json.dumps(
        {
            "rejected": sorted(set(found.rejected))[-MAX_REJECTED_REMEMBERED:],
            "waiting": len(found.waiting),
            "known": len(known),
        }
    )
    if not found.ready:
        return SensorResult(
            skip_reason=f"no new ready run ({len(found.waiting)} settling, {len(known)} known)",
            cursor=new_cursor,
        )
    # Oldest data first: within a tick, runs are queued in source-timestamp order.
    found.ready.sort(key=_data_age_key)
    keys = [listing.run.partition_key for listing in found.ready]
    context.log.info(f"{len(keys)} new workflow run(s): {', '.join(keys[:10])}")
    return SensorResult(
        run_requests=[run_request_for(listing) for listing in found.ready],
        dynamic_partitions_requests=[workflow_runs.build_add_request(keys)],
        cursor=new_cursor,
    )
