"""The landing sensor, evaluated as the daemon evaluates it, against moto server."""

from __future__ import annotations

import json
import uuid

import boto3
import pytest
from dagster import instance_for_test

from publish_platform.config import Settings
from publish_platform.landing import RunRef
from publish_platform.local_s3 import notify_landing_queue
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


def test_with_a_landing_queue_a_tick_looks_only_at_runs_named_by_events(
    s3, settings: Settings, monkeypatch
) -> None:
    """ObjectCreated notifications name the new run folders, so a tick lists those (and the
    ones still settling) instead of the whole history; a folder whose notification never came
    is found by the periodic full listing."""
    landing = settings.landing_location
    runs = [RunRef("postgres", "wf", f"{n:08d}-0000-4000-8000-000000000000") for n in range(5)]
    land(s3, landing, runs[0], upstream_files(), manifest_for(runs[0]))  # before the queue
    queue_url = notify_landing_queue(s3, landing.bucket, f"landing-{uuid.uuid4().hex}")
    monkeypatch.setenv("PUBLISH_PLATFORM_LANDING_QUEUE_URL", queue_url)
    monkeypatch.setenv("PUBLISH_PLATFORM_SETTLE_SECONDS", "3600")

    with instance_for_test() as instance:
        first = sensor_tick(instance)  # no full listing yet: one now
        assert [r.partition_key for r in first.run_requests] == [runs[0].partition_key]

        sqs = boto3.client("sqs", endpoint_url=s3.meta.endpoint_url)
        land(s3, landing, runs[3], upstream_files(), manifest_for(runs[3]))
        sqs.purge_queue(QueueUrl=queue_url)  # its notifications are lost
        land(s3, landing, runs[1], upstream_files(), manifest_for(runs[1]))
        land(s3, landing, runs[2], upstream_files())  # no manifest: settles for an hour
        second = sensor_tick(instance, first.cursor)
        assert [r.partition_key for r in second.run_requests] == [runs[1].partition_key]
        assert json.loads(second.cursor)["waiting_keys"] == [runs[2].partition_key]

        monkeypatch.setenv("PUBLISH_PLATFORM_SETTLE_SECONDS", "0")
        third = sensor_tick(
            instance, second.cursor
        )  # no new event: the settling folder is re-checked
        assert [r.partition_key for r in third.run_requests] == [runs[2].partition_key]

        monkeypatch.setenv("PUBLISH_PLATFORM_LANDING_FULL_SCAN_MINUTES", "0.0001")
        fourth = sensor_tick(instance, third.cursor)  # the periodic full listing
        assert [r.partition_key for r in fourth.run_requests] == [runs[3].partition_key]
        left = sqs.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        assert left["Attributes"]["ApproximateNumberOfMessages"] == "0"  # all acknowledged


def test_the_s3_client_is_made_once_per_configuration_and_aws_environment(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sensor tick and step asks for the client: a new boto3 session each time cost up to
    0.4 s of CPU. Another configuration or AWS environment must still get a client of its own."""
    from publish_platform.defs.resources import SharedS3Resource

    first = SharedS3Resource().get_client()
    assert SharedS3Resource().get_client() is first
    assert first.meta.endpoint_url == moto_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    moved = SharedS3Resource().get_client()
    assert moved is not first and moved.meta.endpoint_url == "http://127.0.0.1:1"
    assert SharedS3Resource(max_attempts=2).get_client() not in (first, moved)
    monkeypatch.undo()
    assert SharedS3Resource().get_client() is first
