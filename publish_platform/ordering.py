"""Ordering of batches: the tags every run of a batch carries, and its queue priority.

Dagster's run queue enforces one run per source at a time (``tag_concurrency_limits`` on
``publish_platform/source`` in dagster.yaml) and dequeues by ``dagster/priority``. The tags are
computed here from the batch itself, for every way a run starts: the sensor, the launchpad,
backfills, retries and the CLI (``tags_for_partition_key_fn`` of the job's partitioned config).

Priority = data age in minutes since the source was read (uncapped: older data always outranks
newer data, so no batch starves and, within a source, older batches run first) + 10 × source
importance (configured, -50..50: worth up to ±500 minutes of age) + smallness (up to 10 for
small workflows).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from pydantic import ValidationError

from publish_platform.config import Settings, load_settings
from publish_platform.landing import (
    PublishRequest,
    RunListing,
    RunRef,
    list_run,
    read_object,
)

SOURCE_TAG = "publish_platform/source"
PRIORITY_TAG = "dagster/priority"
UNKNOWN_SOURCE = "unknown"
PEEK_BYTES = 256 * 1024
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchProfile:
    """What ordering needs to know of a batch, read cheaply (a LIST and one small GET)."""

    run: RunRef
    source: str | None
    source_timestamp: datetime | None
    data_bytes: int
    importance_hint: int | None = None


def profile_batch(
    s3: Any, settings: Settings, run: RunRef, listing: RunListing | None = None
) -> BatchProfile:
    landing = settings.landing_location
    listing = listing or list_run(s3, landing, run)
    data_bytes = sum(o.size for o in listing.data_files)
    if listing.manifest is not None:
        try:
            manifest = PublishRequest.model_validate_json(
                read_object(s3, landing.bucket, listing.manifest.key)
            )
        except ValidationError:
            return BatchProfile(run, None, None, data_bytes)
        hint = manifest.priority.importance if manifest.priority else None
        return BatchProfile(
            run,
            manifest.connection_qualified_name,
            _utc(manifest.source_timestamp),
            data_bytes,
            hint,
        )
    source, synced = _peek_first_entity(s3, landing.bucket, listing)
    timestamp = synced or listing.last_modified
    return BatchProfile(run, source, timestamp and _utc(timestamp), data_bytes)


def _peek_first_entity(
    s3: Any, bucket: str, listing: RunListing
) -> tuple[str | None, datetime | None]:
    for data_file in listing.data_files:
        if data_file.size == 0:
            continue
        head = s3.get_object(Bucket=bucket, Key=data_file.key, Range=f"bytes=0-{PEEK_BYTES - 1}")
        first_line = head["Body"].read().split(b"\n", 1)[0]
        try:
            attributes = orjson.loads(first_line).get("attributes") or {}
        except (orjson.JSONDecodeError, AttributeError):
            return None, None
        synced = attributes.get("lastSyncRunAt")
        return (
            attributes.get("connectionQualifiedName"),
            datetime.fromtimestamp(synced / 1000, UTC) if isinstance(synced, int) else None,
        )
    return None, None


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def priority(profile: BatchProfile, settings: Settings, now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    importance = settings.source_importance.get(profile.source or "", profile.importance_hint or 0)
    importance = max(-50, min(50, importance))
    age_minutes = 0
    if profile.source_timestamp is not None:
        age_minutes = max(0, int((now - profile.source_timestamp).total_seconds() // 60))
    megabytes = max(1.0, profile.data_bytes / 1_000_000)
    size_term = max(0, 10 - int(math.log2(megabytes)))
    return age_minutes + 10 * importance + size_term


def batch_tags(
    profile: BatchProfile, settings: Settings, now: datetime | None = None
) -> dict[str, str]:
    run = profile.run
    return {
        SOURCE_TAG: profile.source or UNKNOWN_SOURCE,
        PRIORITY_TAG: str(priority(profile, settings, now)),
        "publish_platform/app": run.app,
        "publish_platform/workflow_id": run.workflow_id,
        "publish_platform/workflow_run_id": run.run_id,
    }


@lru_cache(maxsize=8192)
def _cached_profile(partition_key: str, landing: str) -> BatchProfile:
    from publish_platform.local_s3 import s3_client

    return profile_batch(s3_client(), load_settings(), RunRef.from_partition_key(partition_key))


def cached_profile(partition_key: str) -> BatchProfile:
    """The profile of a ready batch (immutable once ready), cached per process."""
    return _cached_profile(partition_key, load_settings().landing)


def tags_for_partition(partition_key: str) -> dict[str, str]:
    """Tags of any run of this partition (used by the job's partitioned config)."""
    settings = load_settings()
    try:
        profile = cached_profile(partition_key)
    except Exception as exc:  # noqa: BLE001 - a launch must not fail because ordering cannot look
        # Without its source the run takes the shared "unknown" slot: serialized, never parallel.
        logger.warning("cannot profile %s for ordering: %s", partition_key, exc)
        profile = BatchProfile(RunRef.from_partition_key(partition_key), None, None, 0)
    return batch_tags(profile, settings)
