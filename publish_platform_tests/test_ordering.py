"""Ordering: source tags and priority on every run of a batch; the queue's per-source limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from dagster import DagsterInstance, build_sensor_context, instance_for_test

from publish_platform.config import Settings
from publish_platform.defs import defs
from publish_platform.landing import RunRef
from publish_platform.ordering import (
    PRIORITY_TAG,
    SOURCE_TAG,
    BatchProfile,
    batch_tags,
    priority,
    profile_batch,
    tags_for_partition,
)
from publish_platform.runtime import write_instance_yaml
from publish_platform_tests.support import (
    UPSTREAM_REF,
    UPSTREAM_SOURCE,
    land,
    manifest_for,
    upstream_files,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _profile(source: str, minutes_old: float, megabytes: float = 1) -> BatchProfile:
    return BatchProfile(
        UPSTREAM_REF, source, NOW - timedelta(minutes=minutes_old), int(megabytes * 1_000_000)
    )


def test_priority_prefers_older_data_smaller_workflows_and_important_sources() -> None:
    settings = Settings(source_importance={"important": 40, "minor": -20})
    older, newer = _profile("s", 120), _profile("s", 30)
    assert priority(older, settings, NOW) > priority(newer, settings, NOW)
    assert priority(_profile("s", 30, 1), settings, NOW) > priority(
        _profile("s", 30, 4000), settings, NOW
    )
    assert (
        priority(_profile("important", 0), settings, NOW)
        == priority(_profile("s", 0), settings, NOW) + 400
    )
    # Importance is bounded, age is not: a waiting minor source eventually outranks new work.
    assert priority(_profile("minor", 60 * 24), settings, NOW) > priority(
        _profile("important", 0), settings, NOW
    )
    # Within a source, older data always comes first, however old both are.
    assert priority(_profile("s", 400_000), settings, NOW) > priority(
        _profile("s", 399_999), settings, NOW
    )
    tags = batch_tags(older, settings, NOW)
    assert tags[SOURCE_TAG] == "s" and int(tags[PRIORITY_TAG]) == priority(older, settings, NOW)


def test_profile_reads_the_manifest_or_peeks_at_the_data(s3, settings: Settings) -> None:
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_files())
    peeked = profile_batch(s3, settings, UPSTREAM_REF)
    assert peeked.source == UPSTREAM_SOURCE
    assert peeked.source_timestamp is not None and peeked.source_timestamp.year >= 2026
    assert peeked.data_bytes == sum(
        len(v) for k, v in upstream_files().items() if k.endswith(".json")
    )

    with_manifest = RunRef("postgres", "pg-local-extract", "44444444-4444-4444-8444-444444444444")
    manifest = manifest_for(with_manifest, priority={"importance": 30})
    land(s3, landing, with_manifest, upstream_files(), manifest)
    profile = profile_batch(s3, settings, with_manifest)
    assert profile.source == UPSTREAM_SOURCE
    assert profile.source_timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    assert profile.importance_hint == 30


def test_every_launch_of_a_partition_carries_source_and_priority(s3, settings: Settings) -> None:
    land(s3, settings.landing_location, UPSTREAM_REF, upstream_files())
    expected = tags_for_partition(UPSTREAM_REF.partition_key)
    assert expected[SOURCE_TAG] == UPSTREAM_SOURCE and int(expected[PRIORITY_TAG]) > 0

    with instance_for_test() as instance:
        # The sensor's run request, resolved as the daemon resolves it.
        sensor = defs.get_sensor_def("landing_sensor")
        context = build_sensor_context(instance=instance, resources=defs.resources)
        tick = sensor(context)
        assert [r.partition_key for r in tick.run_requests] == [UPSTREAM_REF.partition_key]
        instance.add_dynamic_partitions("workflow_runs", [UPSTREAM_REF.partition_key])
        resolved = tick.run_requests[0].with_resolved_tags_and_config(
            target_definition=defs.resolve_job_def("publish_batch"),
            dynamic_partitions_requests=[],
            dynamic_partitions_store=instance,
        )
        assert resolved.tags[SOURCE_TAG] == UPSTREAM_SOURCE
        assert PRIORITY_TAG in resolved.tags

        # A run started from code (the launchpad, backfills and `drain` go the same way).
        result = defs.resolve_job_def("publish_batch").execute_in_process(
            partition_key=UPSTREAM_REF.partition_key, instance=instance
        )
        assert result.success
        assert result.dagster_run.tags[SOURCE_TAG] == UPSTREAM_SOURCE
        assert PRIORITY_TAG in result.dagster_run.tags


def test_the_run_queue_allows_one_run_per_source(tmp_path: Path) -> None:
    for storage in ("sqlite", "postgres"):
        config = yaml.safe_load(write_instance_yaml(tmp_path / storage, storage).read_text())
        limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
        assert {
            "key": SOURCE_TAG,
            "value": {"applyLimitPerUniqueValue": True},
            "limit": 1,
        } in limits
    instance = DagsterInstance.from_config(str(tmp_path / "sqlite"))
    try:
        queue = instance.run_coordinator.get_run_queue_config()
        assert any(
            limit["key"] == SOURCE_TAG and limit["limit"] == 1
            for limit in queue.tag_concurrency_limits
        )
    finally:
        instance.dispose()
