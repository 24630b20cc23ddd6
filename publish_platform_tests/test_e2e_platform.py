"""End to end, with real parts: moto server, dagster-daemon, dagster-webserver (GraphQL), catalog.

The fixture run lands and is published by the daemon's sensor; a changed run of the same source
follows (added, changed, removed entities; volatile attributes changed everywhere) and the
catalog must equal it, with only the real changes written; a volatile-only run writes nothing;
then a republish through the webserver's GraphQL API must neither duplicate nor lose anything.
Dagster runs on SQLite here (the embedded default); the fault and security tests run the daemon
and webserver on Postgres as dagster.yaml documents.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest
from dagster import DagsterInstance, DagsterRunStatus

from publish_platform.config import DEFAULT_VOLATILE_ATTRIBUTES
from publish_platform.demo import (
    changed_run,
    fixture_root,
    fixture_run_folder,
    partition_key_of,
    read_run_entities,
    resynced_run,
    write_run,
)
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.publish_state import PublishStatus, derive_states
from publish_platform.runtime import running_platform, wait_for_state
from publish_platform_tests.commands import run_cli

pytestmark = pytest.mark.slow


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env)


def _wait_for(instance: DagsterInstance, landing: str, key: str, timeout: float = 240) -> object:
    return wait_for_state(instance, landing, key, timeout=timeout)


def _strip_volatile(entity: dict) -> dict:
    attributes = {
        k: v for k, v in entity["attributes"].items() if k not in DEFAULT_VOLATILE_ATTRIBUTES
    }
    return {**{k: v for k, v in entity.items() if k != "guid"}, "attributes": attributes}


def _identity(entity: dict) -> tuple[str, str]:
    return entity["typeName"], entity["attributes"]["qualifiedName"]


@pytest.fixture
def platform(tmp_path: Path, moto_endpoint: str):
    """A running platform: its env, Dagster instance, catalog and webserver URL."""
    with running_platform(tmp_path, moto_endpoint) as running:
        catalog = SqlCatalog(running.env["PUBLISH_PLATFORM_METASTORE"])
        try:
            yield running.env, running.instance, catalog, running.url
        finally:
            catalog.close()


def test_publish_change_and_republish(platform, tmp_path: Path) -> None:
    env, instance, catalog, url = platform
    landing = env["PUBLISH_PLATFORM_LANDING"]

    # 1. The real SDK run lands (no manifest: marker-less readiness) and is published.
    _cli(env, "land", str(fixture_root()))
    first_key = partition_key_of(fixture_run_folder())
    first = _wait_for(instance, landing, first_key)
    assert first.status == PublishStatus.COMPLETE, first.failure_details
    first_entities = [e for rows in read_run_entities(fixture_run_folder()).values() for e in rows]
    assert first.metrics.creates == len(first_entities) == first.metrics.published
    source = first.source_id
    versions_after_first = catalog.versions(source)
    assert set(versions_after_first.values()) == {1}

    # 2. A changed run of the same source: the catalog must equal it, only changes written.
    second = changed_run(tmp_path / "second")
    _cli(env, "land", str(second.root))
    state = _wait_for(instance, landing, second.partition_key)
    assert state.status == PublishStatus.COMPLETE, state.failure_details
    expected = {_identity(e): e for e in second.entities}
    dumped = [
        orjson.loads(line)
        for line in _cli(env, "catalog", "dump", "--source", source).stdout.splitlines()
    ]
    assert len(dumped) == len(expected)
    assert {_identity(e): _strip_volatile(e) for e in dumped} == {
        k: _strip_volatile(e) for k, e in expected.items()
    }
    first_by_id = {_identity(e): _strip_volatile(e) for e in first_entities}
    added = set(expected) - set(first_by_id)
    removed = set(first_by_id) - set(expected)
    changed = {
        k
        for k in set(expected) & set(first_by_id)
        if _strip_volatile(expected[k]) != first_by_id[k]
    }
    assert added and removed and changed
    assert (state.metrics.creates, state.metrics.updates, state.metrics.deletes) == (
        len(added),
        len(changed),
        len(removed),
    )
    assert state.metrics.unchanged == len(expected) - len(added) - len(changed)
    versions = catalog.versions(source)
    for identity, version in versions.items():
        if identity in changed or identity in removed:
            assert version == 2, identity
        else:
            assert version == 1, identity  # unchanged entities were not rewritten

    # 3. Only volatile attributes changed: an empty plan and zero writes.
    volatile_only = resynced_run(tmp_path / "third", second)
    _cli(env, "land", str(volatile_only.root))
    third = _wait_for(instance, landing, volatile_only.partition_key)
    assert third.status == PublishStatus.COMPLETE, third.failure_details
    assert third.metrics.unchanged == len(expected)
    assert (third.metrics.creates, third.metrics.updates, third.metrics.deletes) == (0, 0, 0)
    assert third.metrics.requests == 0
    assert catalog.versions(source) == versions

    # 4. Republish the newest batch through the webserver's GraphQL API, forcing every entity.
    # (Republishing an older one would be superseded: newer data of the source is published.)
    from dagster_graphql import DagsterGraphQLClient

    guids_before = {_identity(e): e["guid"] for e in catalog.dump(source)}
    host, port = url.removeprefix("http://").split(":")
    client = DagsterGraphQLClient(host, port_number=int(port))
    run_id = client.submit_job_execution(
        "publish_batch",
        run_config={"ops": {"diff": {"config": {"force": True}}}},
        tags={"dagster/partition": volatile_only.partition_key},
    )
    deadline = time.monotonic() + 240
    while client.get_run_status(run_id) not in (
        DagsterRunStatus.SUCCESS,
        DagsterRunStatus.FAILURE,
        DagsterRunStatus.CANCELED,
    ):
        assert time.monotonic() < deadline, "republish did not finish"
        time.sleep(1)
    assert client.get_run_status(run_id) == DagsterRunStatus.SUCCESS
    republished = derive_states(instance, landing, [volatile_only.partition_key])[0]
    assert republished.dagster_run_id == run_id
    assert republished.status == PublishStatus.COMPLETE
    assert republished.metrics.updates == len(expected)
    after = list(catalog.dump(source))
    assert len(after) == len(expected)  # nothing duplicated, nothing lost
    assert {_identity(e): e["guid"] for e in after} == guids_before
    assert {_identity(e): _strip_volatile(e) for e in after} == {
        k: _strip_volatile(e) for k, e in expected.items()
    }
    assert all(catalog.versions(source)[k] == versions[k] + 1 for k in expected)

    # The status command shows every batch, as the seed's PublishState plus the partition key.
    listed = orjson.loads(_cli(env, "status", "--json").stdout)["batches"]
    assert {row["partition_key"] for row in listed} == {
        first_key,
        second.partition_key,
        volatile_only.partition_key,
    }
    assert all(row["status"] == "COMPLETE" for row in listed)
    assert {
        "batch_id",
        "source_id",
        "workflow_run_id",
        "s3_path",
        "status",
        "metrics",
        "failure_details",
    } <= set(listed[0])


def _versioned_run(root: Path, run_id: str, label: str, source_timestamp: str):
    """The fixture's source, with a description marking which batch wrote it, and a manifest."""
    folder = fixture_run_folder()
    files = read_run_entities(folder)
    for entity in files["table"]:
        entity["attributes"]["description"] = f"written by {label}"
    source = files["table"][0]["attributes"]["connectionQualifiedName"]
    manifest = {
        "connection_qualified_name": source,
        "workflow_id": folder.parent.name,
        "run_id": run_id,
        "status": "SUCCEEDED",
        "source_timestamp": source_timestamp,
        "processing_timestamp": source_timestamp,
        "mode": "full",
    }
    return write_run(root, folder.parents[2].name, folder.parent.name, run_id, files, manifest)


def test_one_run_per_source_older_first_and_late_old_batches_superseded(
    platform, tmp_path: Path
) -> None:
    env, instance, catalog, _ = platform
    landing = env["PUBLISH_PLATFORM_LANDING"]
    runs = [
        _versioned_run(
            tmp_path / f"b{i}", str(uuid.uuid4()), f"batch {i}", f"2026-03-0{i}T00:00:00Z"
        )
        for i in (1, 2, 3)
    ]
    # All three land before the sensor looks: one tick queues them together.
    staged = tmp_path / "all"
    for run in runs:
        shutil.copytree(run.root, staged, dirs_exist_ok=True)
    _cli(env, "land", str(staged))
    states = [_wait_for(instance, landing, run.partition_key) for run in runs]
    assert [s.status for s in states] == [PublishStatus.COMPLETE] * 3

    records = [instance.get_run_record_by_id(s.dagster_run_id) for s in states]
    intervals = sorted((r.start_time, r.end_time, i) for i, r in enumerate(records))
    # One run per source at a time, oldest data first.
    assert [i for _, _, i in intervals] == [0, 1, 2]
    for (_, end, _), (start, _, _) in zip(intervals, intervals[1:], strict=False):
        assert end <= start
    source = states[0].source_id
    descriptions = {
        e["attributes"]["description"] for e in catalog.dump(source) if e["typeName"] == "Table"
    }
    assert descriptions == {"written by batch 3"}

    # A batch of older data landing after newer data was published is superseded.
    late = _versioned_run(
        tmp_path / "late", str(uuid.uuid4()), "late batch", "2026-02-01T00:00:00Z"
    )
    _cli(env, "land", str(late.root))
    state = _wait_for(instance, landing, late.partition_key)
    assert state.status == PublishStatus.SUPERSEDED, state.model_dump_json(indent=1)
    assert "older" in state.failure_details.message
    descriptions = {
        e["attributes"]["description"] for e in catalog.dump(source) if e["typeName"] == "Table"
    }
    assert descriptions == {"written by batch 3"}
