"""The three steps of a batch over S3 (moto server), the state store and the SQL catalog."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from publish_platform.entities import FILLED, references_of
from publish_platform.landing import RunRef
from publish_platform.pipeline import (
    StalePlanError,
    publish_with_replan,
    read_diff,
    read_plan,
    run_diff,
    run_plan,
    run_publish,
)
from publish_platform.state import StaleStateError, StateStore

from .support import (
    UPSTREAM_ENTITIES,
    UPSTREAM_REF,
    UPSTREAM_SOURCE,
    land,
    manifest_for,
    resync,
    upstream_data,
    upstream_entities,
    upstream_files,
    with_sidecars,
)

SECOND_RUN = RunRef("postgres", "pg-local-extract", "22222222-2222-4222-8222-222222222222")


def resynced_run() -> dict[str, bytes]:
    """The same metadata read again by a later run: every volatile attribute differs."""
    data = {
        key: resync(value, SECOND_RUN.run_id, 1_800_000_000_000, "pg-local-extract-cron")
        for key, value in upstream_data().items()
    }
    assert all(data[k] != v for k, v in upstream_data().items())
    return with_sidecars(data)


def publish(s3, state, settings, catalog, partition_key: str):
    diff = run_diff(s3, state, settings, partition_key)
    _, plan, checks = run_plan(state, settings, partition_key)
    result = run_publish(state, settings, catalog, partition_key)
    return diff, plan, checks, result


def test_first_publish_of_the_real_run(s3, state, settings, catalog):
    land(s3, settings.landing_location, UPSTREAM_REF, upstream_files())
    key = UPSTREAM_REF.partition_key

    diff = run_diff(s3, state, settings, key)
    assert diff.outcome == "diffed" and diff.problems == []
    assert diff.source == UPSTREAM_SOURCE  # derived from the data: no manifest
    assert diff.mode == "full"
    assert (diff.files, diff.lines, diff.valid_entities) == (5, 38, 38)
    assert (diff.creates, diff.updates, diff.deletes, diff.unchanged) == (38, 0, 0, 0)
    newest_sync = max(e["attributes"]["lastSyncRunAt"] for e in upstream_entities())
    assert diff.source_timestamp == datetime.fromtimestamp(newest_sync / 1000, UTC)
    stored_diff = read_diff(state, key)[0]
    assert stored_diff.model_dump(exclude={"duration_s"}) == diff.model_dump(exclude={"duration_s"})

    _, plan, checks = run_plan(state, settings, key)
    assert plan.header.creates == 38 and plan.header.base_serial == 0
    assert {c.name: c.passed for c in checks} == {
        "scope": True,
        "deletion_safety": True,
        "references": True,
        "required_attributes": True,
    }
    stored = read_plan(state, key)
    assert stored.header == plan.header
    # The plan step returns its operations (scanned from its copy of the stored plan) without
    # their JSON, references, hashes and guids, which it streamed into the stored plan: every
    # planned entity's, as the fixture has them.
    assert stored.operations.drop(FILLED).equals(plan.operations.drop("entity_row").collect())
    by_name = {e["attributes"]["qualifiedName"]: e for e in upstream_entities()}
    stored_rows = stored.operations.select("qualified_name", "entity", "references").rows()
    for name, stored_json, references in stored_rows:
        assert orjson.loads(stored_json) == by_name[name]
        assert references == references_of(by_name[name]["attributes"])

    result = run_publish(state, settings, catalog, key)
    assert result.outcome == "published"
    assert (result.serial, result.succeeded, result.failed) == (1, 38, 0)
    assert result.snapshot_entities == UPSTREAM_ENTITIES

    pointer, _ = state.read_pointer(UPSTREAM_SOURCE)
    assert pointer.serial == 1 and pointer.partition_key == key and pointer.entities == 38
    snapshot = state.read_snapshot(UPSTREAM_SOURCE, 1)
    assert snapshot.height == 38 and snapshot["guid"].null_count() == 0
    dumped = list(catalog.dump(UPSTREAM_SOURCE))
    assert len(dumped) == 38
    assert {e["guid"] for e in dumped} == set(snapshot["guid"])
    assert set(catalog.versions(UPSTREAM_SOURCE).values()) == {1}


def test_unchanged_second_landing_writes_nothing(s3, state, settings, catalog):
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_files())
    publish(s3, state, settings, catalog, UPSTREAM_REF.partition_key)
    versions = catalog.versions()
    snapshot = state.read_snapshot(UPSTREAM_SOURCE, 1)

    land(s3, landing, SECOND_RUN, resynced_run())
    diff, plan, checks, result = publish(s3, state, settings, catalog, SECOND_RUN.partition_key)

    assert diff.outcome == "diffed" and diff.base_serial == 1
    assert (diff.creates, diff.updates, diff.deletes, diff.unchanged) == (0, 0, 0, 38)
    assert plan.operations.collect().height == 0 and plan.header.operations == 0
    assert all(check.passed for check in checks)
    assert result.outcome == "nothing_to_publish" and result.serial == 1
    assert catalog.versions() == versions  # not a single metastore write
    # Only the source's data-age watermark moves: a new serial on the very same snapshot.
    pointer, _ = state.read_pointer(UPSTREAM_SOURCE)
    assert pointer.serial == 2 and pointer.partition_key == SECOND_RUN.partition_key
    assert pointer.snapshot_key == state.snapshot_key_of(UPSTREAM_SOURCE, 1)
    assert state.read_snapshot(UPSTREAM_SOURCE, 1).equals(snapshot)


def _plan_both_runs_on_serial_zero(s3, state, settings) -> None:
    """The fixture run and a second run changing one table's description, both diffed and
    planned before either is published: against serial 0, 38 creates each."""
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_files())
    changed = upstream_data()
    table_key = "transformed/table/entities.json"
    changed[table_key] = changed[table_key].replace(b'"description":null', b'"description":"x"', 1)
    land(s3, landing, SECOND_RUN, with_sidecars(changed))
    for run in (UPSTREAM_REF, SECOND_RUN):
        run_diff(s3, state, settings, run.partition_key)
        run_plan(state, settings, run.partition_key)


def test_publishing_a_plan_with_a_stale_base_serial_is_refused(s3, state, settings, catalog):
    _plan_both_runs_on_serial_zero(s3, state, settings)
    assert run_publish(state, settings, catalog, UPSTREAM_REF.partition_key).serial == 1
    versions = catalog.versions()

    with pytest.raises(StalePlanError, match="computed against serial 0"):
        run_publish(state, settings, catalog, SECOND_RUN.partition_key)
    assert issubclass(StalePlanError, StaleStateError)
    assert catalog.versions() == versions
    assert state.current_serial(UPSTREAM_SOURCE) == 1

    # Re-planned on top of the current state it goes through, as the one update it is.
    diff, plan, _, result = publish(s3, state, settings, catalog, SECOND_RUN.partition_key)
    assert diff.base_serial == 1 and (diff.creates, diff.updates) == (0, 1)
    assert result.outcome == "published" and result.serial == 2 and result.succeeded == 1
    assert sum(catalog.versions().values()) == sum(versions.values()) + 1


def test_publish_with_replan_replans_a_stale_plan_and_publishes_it(s3, state, settings, catalog):
    _plan_both_runs_on_serial_zero(s3, state, settings)
    stale_id = read_plan(state, SECOND_RUN.partition_key).header.plan_id
    run_publish(state, settings, catalog, UPSTREAM_REF.partition_key)
    versions = catalog.versions()

    result = publish_with_replan(s3, state, settings, catalog, SECOND_RUN.partition_key)

    assert result.replanned and result.outcome == "published"
    assert (result.serial, result.operations, result.succeeded) == (2, 1, 1)
    replanned = read_plan(state, SECOND_RUN.partition_key).header
    assert replanned.base_serial == 1 and replanned.updates == 1 and replanned.creates == 0
    assert replanned.plan_id != stale_id
    assert read_diff(state, SECOND_RUN.partition_key)[0].base_serial == 1
    changed_table = [k for k, v in catalog.versions().items() if v != versions[k]]
    assert len(changed_table) == 1 and catalog.versions()[changed_table[0]] == 2
    dumped = {e["attributes"]["qualifiedName"]: e for e in catalog.dump(UPSTREAM_SOURCE)}
    assert dumped[changed_table[0][1]]["attributes"]["description"] == "x"
    assert [p.serial for p in state.history(UPSTREAM_SOURCE)] == [1, 2]
    # Not stale any more: publishing again is refused as stale, re-planned, and finds nothing.
    again = publish_with_replan(s3, state, settings, catalog, SECOND_RUN.partition_key)
    assert again.replanned and again.outcome == "nothing_to_publish" and again.serial == 2


def test_history_keeps_older_snapshots_readable(s3, state, settings, catalog):
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_files())
    publish(s3, state, settings, catalog, UPSTREAM_REF.partition_key)
    first = state.read_snapshot(UPSTREAM_SOURCE, 1)
    data = upstream_data()
    columns = data["transformed/column/entities.json"].splitlines()
    data["transformed/column/entities.json"] = b"\n".join(columns[:-1]) + b"\n"
    land(s3, landing, SECOND_RUN, with_sidecars(data))
    publish(s3, state, settings, catalog, SECOND_RUN.partition_key)

    history = state.history(UPSTREAM_SOURCE)
    assert [(p.serial, p.partition_key, p.entities) for p in history] == [
        (1, UPSTREAM_REF.partition_key, 38),
        (2, SECOND_RUN.partition_key, 37),
    ]
    assert state.current_serial(UPSTREAM_SOURCE) == 2
    assert state.read_snapshot(UPSTREAM_SOURCE, 1).equals(first)
    assert state.read_snapshot(UPSTREAM_SOURCE, 2).height == 37


def test_deletes_and_updates_flow_through_to_the_catalog(s3, state, settings, catalog):
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_files())
    publish(s3, state, settings, catalog, UPSTREAM_REF.partition_key)
    data = upstream_data()
    dropped = data["transformed/column/entities.json"].splitlines()
    data["transformed/column/entities.json"] = b"\n".join(dropped[:-3]) + b"\n"
    land(s3, landing, SECOND_RUN, with_sidecars(data))

    diff, plan, checks, result = publish(s3, state, settings, catalog, SECOND_RUN.partition_key)

    assert (diff.deletes, diff.unchanged) == (3, 35)
    assert [row["op"] for row in plan.operations.collect().iter_rows(named=True)] == ["delete"] * 3
    assert next(c for c in checks if c.name == "deletion_safety").passed
    assert result.serial == 2 and result.snapshot_entities == 35
    assert len(list(catalog.dump(UPSTREAM_SOURCE))) == 35
    assert state.read_pointer(UPSTREAM_SOURCE)[0].entities == 35


def test_batch_with_a_bad_checksum_is_quarantined_and_never_published(s3, state, settings, catalog):
    files = upstream_files()
    files["transformed/column/entities.json.sha256"] = b"1" * 64
    land(s3, settings.landing_location, UPSTREAM_REF, files)
    key = UPSTREAM_REF.partition_key

    diff = run_diff(s3, state, settings, key)
    assert diff.outcome == "quarantined"
    assert [p["kind"] for p in diff.problems] == ["checksum_mismatch"]
    _, plan, checks = run_plan(state, settings, key)
    assert plan.operations.collect().height == 0 and all(c.passed for c in checks)
    assert run_publish(state, settings, catalog, key).outcome == "not_publishable"
    assert catalog.versions() == {}
    assert state.current_serial(UPSTREAM_SOURCE) == 0


def test_failed_workflow_run_is_skipped(s3, state, settings, catalog):
    land(
        s3,
        settings.landing_location,
        UPSTREAM_REF,
        upstream_files(),
        manifest=manifest_for(UPSTREAM_REF, status="FAILED"),
    )
    diff = run_diff(s3, state, settings, UPSTREAM_REF.partition_key)
    assert diff.outcome == "skipped"
    assert diff.source == UPSTREAM_SOURCE
    assert run_publish(state, settings, catalog, UPSTREAM_REF.partition_key).outcome == (
        "not_publishable"
    )


def test_manifest_names_source_mode_and_timestamp(s3, state, settings, catalog):
    data = upstream_data()
    # An incremental batch with only the tables, after a full publish: nothing is deleted.
    land(s3, settings.landing_location, UPSTREAM_REF, upstream_files())
    publish(s3, state, settings, catalog, UPSTREAM_REF.partition_key)
    tables = {"transformed/table/entities.json": data["transformed/table/entities.json"]}
    manifest = manifest_for(SECOND_RUN, mode="incremental", source_timestamp="2030-05-01T12:00:00Z")
    land(s3, settings.landing_location, SECOND_RUN, tables, manifest=manifest)

    diff, plan, checks, result = publish(s3, state, settings, catalog, SECOND_RUN.partition_key)

    assert diff.mode == "incremental" and diff.source == UPSTREAM_SOURCE
    assert diff.source_timestamp == datetime(2030, 5, 1, 12, tzinfo=UTC)
    assert (diff.unchanged, diff.deletes) == (7, 0)
    assert result.outcome == "nothing_to_publish"
    assert len(list(catalog.dump(UPSTREAM_SOURCE))) == 38


def test_isolated_lines_are_kept_with_their_reasons(s3, state, settings, catalog):
    data = upstream_data()
    data["transformed/table/entities.json"] += (
        b'{"typeName": "Table"\n'
        + orjson.dumps(
            {
                "typeName": "Table",
                "attributes": {
                    "qualifiedName": "default/other/1/x",
                    "connectionQualifiedName": "default/other/1",
                },
            }
        )
        + b"\n"
    )
    land(s3, settings.landing_location, UPSTREAM_REF, data)
    key = UPSTREAM_REF.partition_key

    diff = run_diff(s3, state, settings, key)

    # The data names two connections and there is no manifest to say which one is the batch's.
    assert diff.outcome == "quarantined"
    assert "several connections" in diff.problems[0]["message"]

    manifest = manifest_for(UPSTREAM_REF)
    land(s3, settings.landing_location, UPSTREAM_REF, {}, manifest=manifest)
    diff = run_diff(s3, state, settings, key)
    assert diff.outcome == "diffed"
    assert diff.issue_counts == {"malformed_json": 1, "wrong_source": 1}
    assert diff.creates == 38 and diff.deletions_withheld is not None
    found = state.get_bytes(state.batch_key(key, "issues.jsonl"))
    issues = [orjson.loads(line) for line in found[0].splitlines()]
    assert [(i["source_file"], i["line"], i["reason"]) for i in issues] == [
        ("transformed/table/entities.json", 8, "malformed_json"),
        ("transformed/table/entities.json", 9, "wrong_source"),
    ]
    run_plan(state, settings, key)
    result = run_publish(state, settings, catalog, key)
    assert result.outcome == "published" and result.succeeded == 38


def test_publish_retried_after_a_crash_before_the_pointer_moved(
    s3, state, settings, catalog, monkeypatch
):
    """The snapshot was written, then the pointer write failed (crash, network): a retry of the
    same plan must complete instead of finding "its" snapshot serial taken forever."""
    land(s3, settings.landing_location, UPSTREAM_REF, upstream_files())
    key = UPSTREAM_REF.partition_key
    run_diff(s3, state, settings, key)
    _, plan, _ = run_plan(state, settings, key)

    def lost(*args, **kwargs):
        raise ConnectionError("connection reset while writing pointer.json")

    monkeypatch.setattr(StateStore, "advance_pointer", lost)
    with pytest.raises(ConnectionError):
        run_publish(state, settings, catalog, key)
    monkeypatch.undo()
    assert state.current_serial(UPSTREAM_SOURCE) == 0
    candidate = state.snapshot_key(UPSTREAM_SOURCE, 1, plan.header.plan_id)
    assert state.get_bytes(candidate) is not None  # orphaned

    result = run_publish(state, settings, catalog, key)

    assert result.outcome == "published" and result.serial == 1
    assert result.resumed == 38  # every chunk was checkpointed: nothing is applied twice
    assert set(catalog.versions().values()) == {1}
    assert state.current_serial(UPSTREAM_SOURCE) == 1
    assert state.read_pointer(UPSTREAM_SOURCE)[0].snapshot_key == candidate
    assert len(list(catalog.dump(UPSTREAM_SOURCE))) == 38
