"""The landing sensor, evaluated as the daemon evaluates it, against moto server."""

from __future__ import annotations

import json

from dagster import instance_for_test

from publish_platform.config import Settings
from publish_platform.landing import RunRef
from publish_platform_tests.support import (
    UPSTREAM_REF,
    land,
    manifest_for,
    sensor_tick,
    upstream_files,
)


def test_each_ready_run_becomes_one_partition_and_one_run_exactly_once(
    s3, settings: Settings, monkeypatch
) -> None:
    monkeypatch.setenv("PUBLISH_PLATFORM_SETTLE_SECONDS", "3600")
    landing = settings.landing_location
    with_manifest = RunRef("postgres", "pg-local-extract", "33333333-3333-4333-8333-333333333333")
    land(s3, landing, UPSTREAM_REF, upstream_files())  # no manifest: settling for an hour
    land(s3, landing, with_manifest, upstream_files(), manifest_for(with_manifest))
    s3.put_object(
        Bucket=landing.bucket, Key=landing.key("artifacts/apps/x/workflows/w/..%2F/f"), Body=b"{}"
    )

    with instance_for_test() as instance:
        first = sensor_tick(instance)
        assert [r.partition_key for r in first.run_requests] == [with_manifest.partition_key]
        assert first.run_requests[0].run_key == with_manifest.partition_key
        assert first.dynamic_partitions_requests[0].partition_keys == [with_manifest.partition_key]
        cursor = json.loads(first.cursor)
        assert cursor["waiting"] == 1 and len(cursor["rejected"]) == 1

        second = sensor_tick(instance, first.cursor)
        assert not second.run_requests  # picked up exactly once

        monkeypatch.setenv("PUBLISH_PLATFORM_SETTLE_SECONDS", "0")
        third = sensor_tick(instance, second.cursor)
        assert [r.partition_key for r in third.run_requests] == [UPSTREAM_REF.partition_key]
        assert set(instance.get_dynamic_partitions("workflow_runs")) == {
            with_manifest.partition_key,
            UPSTREAM_REF.partition_key,
        }
        assert not sensor_tick(instance, third.cursor).run_requests
