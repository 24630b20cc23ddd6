"""The landing sensor: one dynamic partition and one run per ready workflow run."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster_aws.s3 import S3Resource

from publish_platform.config import Settings, load_settings
from publish_platform.defs.jobs import publish_batch
from publish_platform.defs.partitions import workflow_runs
from publish_platform.defs.resources import PlatformResource
from publish_platform.landing import (
    InvalidRunFolder,
    LandingEvents,
    RunListing,
    RunRef,
    acknowledge,
    discover,
    receive_landing_events,
)
from publish_platform.ordering import cached_profile

MAX_REJECTED_REMEMBERED = 1000
MAX_WAITING_REMEMBERED = 10_000


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


def _runs_named_by_events(
    settings: Settings, sqs: Any, cursor: dict[str, Any], now: datetime
) -> tuple[list[RunRef | InvalidRunFolder] | None, LandingEvents | None, str | None]:
    """With a landing queue: the run folders named by new events, plus those still settling
    since earlier ticks (no event says when a settle period ends). None instead when a full
    listing is due (never done, or older than landing_full_scan_minutes), which also catches
    any lost notification. Without a queue, every tick is a full listing."""
    full_scan_at = cursor.get("full_scan_at")
    if not settings.landing_queue_url:
        return None, None, now.isoformat()
    events = receive_landing_events(sqs, settings.landing_queue_url, settings.landing_location)
    due = full_scan_at is None or now - datetime.fromisoformat(full_scan_at) >= timedelta(
        minutes=settings.landing_full_scan_minutes
    )
    if due:
        return None, events, now.isoformat()
    runs: dict[str, RunRef | InvalidRunFolder] = {
        key: RunRef.from_partition_key(key) for key in cursor.get("waiting_keys", [])
    }
    runs.update(events.runs)
    return list(runs.values()), events, full_scan_at


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
    now = datetime.now(UTC)
    sqs = boto3.client("sqs") if settings.landing_queue_url else None
    runs, events, full_scan_at = _runs_named_by_events(settings, sqs, cursor, now)
    found = discover(
        s3.get_client(),
        settings.landing_location,
        known,
        settings.settle_seconds,
        now=now,
        runs=runs,
    )
    for reason in found.rejected:
        if reason not in rejected_before:
            context.log.error(f"run folder ignored: {reason}")
    for key, reason in found.waiting.items():
        context.log.debug(f"{key} not ready: {reason}")
    new_cursor = json.dumps(
        {
            # A full listing sees every unusable folder; events only the new ones.
            "rejected": sorted(
                set(found.rejected) if runs is None else rejected_before | set(found.rejected)
            )[-MAX_REJECTED_REMEMBERED:],
            "waiting": len(found.waiting),
            "waiting_keys": sorted(found.waiting)[:MAX_WAITING_REMEMBERED],
            "known": len(known),
            "full_scan_at": full_scan_at,
        }
    )
    if events is not None and settings.landing_queue_url:
        acknowledge(sqs, settings.landing_queue_url, events.receipts)
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
