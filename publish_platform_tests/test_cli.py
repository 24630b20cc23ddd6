"""The operator commands, run as a user runs them: ``publish-platform …`` in a subprocess."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from publish_platform.config import Settings
from publish_platform.landing import RunRef
from publish_platform_tests.commands import run_cli
from publish_platform_tests.support import (
    UPSTREAM_ENTITIES,
    UPSTREAM_REF,
    UPSTREAM_RUN,
    UPSTREAM_SOURCE,
    land,
    manifest_for,
    upstream_files,
)


@pytest.fixture
def cli(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return run_cli


def test_land_drain_status_dump(cli, s3, settings: Settings) -> None:
    landed = cli("land", str(UPSTREAM_RUN))
    assert "landed 10 object(s)" in landed.stdout
    keys = {
        o["Key"] for o in s3.list_objects_v2(Bucket=settings.landing_location.bucket)["Contents"]
    }
    assert UPSTREAM_REF.prefix_in_landing() + "transformed/table/entities.json" in keys

    drained = cli("drain")
    assert f"{UPSTREAM_REF.partition_key}: COMPLETE" in drained.stdout
    assert "drained 1 batch(es), 0 not published" in drained.stdout

    # Picked up exactly once: a second drain finds nothing new.
    assert "nothing to drain" in cli("drain").stdout

    states = orjson.loads(cli("status", "--json").stdout)["batches"]
    assert len(states) == 1
    state = states[0]
    assert state["partition_key"] == UPSTREAM_REF.partition_key
    assert state["status"] == "COMPLETE"
    assert state["source_id"] == UPSTREAM_SOURCE
    assert state["workflow_run_id"] == UPSTREAM_REF.run_id
    assert state["metrics"]["creates"] == UPSTREAM_ENTITIES
    assert state["s3_path"].endswith(UPSTREAM_REF.prefix_in_landing())
    table = cli("status").stdout
    assert UPSTREAM_REF.partition_key in table and "COMPLETE" in table

    dumped = [orjson.loads(line) for line in cli("catalog", "dump").stdout.splitlines()]
    assert len(dumped) == UPSTREAM_ENTITIES
    assert all(e["guid"] and e["attributes"]["qualifiedName"] and e["typeName"] for e in dumped)
    assert cli("catalog", "dump", "--source", "default/other/1").stdout == ""


def test_drain_fails_when_a_batch_is_not_publishable(cli, s3, settings: Settings) -> None:
    bad = RunRef("postgres", "pg-local-extract", "22222222-2222-4222-8222-222222222222")
    files = upstream_files()
    files["transformed/table/entities.json"] += b'{"typeName": "Table"}\n'  # sidecar now wrong
    land(s3, settings.landing_location, bad, files)

    drained = cli("drain", check=False)
    assert drained.returncode == 1
    assert f"{bad.partition_key}: QUARANTINED" in drained.stdout
    state = orjson.loads(cli("status", "--json").stdout)["batches"][0]
    assert state["status"] == "QUARANTINED"
    assert "sha256" in state["failure_details"]["message"]
    assert cli("catalog", "dump").stdout == ""  # nothing of it was published


def test_a_batch_deleting_60_percent_is_held_until_an_operator_approves(
    cli, s3, settings: Settings
) -> None:
    cli("land", str(UPSTREAM_RUN))
    cli("drain")
    shrunk = RunRef("postgres", "pg-local-extract", "55555555-5555-4555-8555-555555555555")
    files = {k: v for k, v in upstream_files().items() if not k.endswith(".sha256")}
    columns = files["transformed/column/entities.json"].splitlines(keepends=True)
    files["transformed/column/entities.json"] = b"".join(columns[:2])  # 23 of 25 columns gone
    files.pop("transformed/extras-procedure/entities.json")
    newer = manifest_for(shrunk, source_timestamp="2030-01-01T00:00:00Z")
    land(s3, settings.landing_location, shrunk, files, newer)

    held = cli("drain", check=False)
    assert held.returncode == 1
    assert f"{shrunk.partition_key}: HELD" in held.stdout
    state = next(
        s
        for s in orjson.loads(cli("status", "--json").stdout)["batches"]
        if s["partition_key"] == shrunk.partition_key
    )
    assert state["status"] == "HELD"
    assert "deletes 66%" in state["failure_details"]["message"]
    assert len(cli("catalog", "dump").stdout.splitlines()) == UPSTREAM_ENTITIES  # untouched

    approved = cli(
        "approve",
        shrunk.partition_key,
        "--by",
        "alice",
        "--reason",
        "tables dropped",
        "--in-process",
    )
    assert f"{shrunk.partition_key}: COMPLETE" in approved.stdout
    assert len(cli("catalog", "dump").stdout.splitlines()) == UPSTREAM_ENTITIES - 25
    from dagster import AssetKey, DagsterInstance

    instance = DagsterInstance.get()
    try:
        plan = instance.get_latest_materialization_event(AssetKey("plan")).asset_materialization
        assert plan.partition == shrunk.partition_key
        assert plan.metadata["approved_by"].value == "alice"
        assert plan.metadata["approval_reason"].value == "tables dropped"
        runs = instance.get_runs()
        assert runs[0].tags["publish_platform/approved_by"] == "alice"
    finally:
        instance.dispose()
