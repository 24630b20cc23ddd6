"""Modes and deletion safety: incremental batches never delete; a full batch deleting more than
its source's threshold (global default, per-source override) is held until an operator approves,
through the Dagster job exactly as an operator runs it."""

from __future__ import annotations

import json

import pytest
from dagster import AssetKey, DagsterInstance, Failure, instance_for_test

from publish_platform.config import load_settings
from publish_platform.defs import defs
from publish_platform.defs.assets import PlanConfig
from publish_platform.landing import RunRef
from publish_platform.pipeline import (
    PlanHeldError,
    publish_with_replan,
    read_plan,
    run_diff,
    run_plan,
    run_publish,
)
from publish_platform.plan import Approval
from publish_platform.publish_state import PublishStatus, derive_states

from .support import (
    SOURCE,
    catalog_identities,
    entity,
    identities,
    land_batch,
    run_batch,
    small_source,
)

OTHER = "default/test/2"
FIRST = RunRef("test", "wf", "run-1")
SECOND = RunRef("test", "wf", "run-2")
THIRD = RunRef("test", "wf", "run-3")


def ten(source: str = SOURCE) -> list[dict]:
    """Database, schema, four tables with one column each."""
    entities = [entity("Database", "db", source), entity("Schema", "db/s", source)]
    for table in ("t1", "t2", "t3", "t4"):
        entities.append(entity("Table", f"db/s/{table}", source))
        entities.append(entity("Column", f"db/s/{table}/c", source))
    return entities


def without_tables(entities: list[dict], *tables: str) -> list[dict]:
    return [
        e
        for e in entities
        if not any(f"/db/s/{t}" in e["attributes"]["qualifiedName"] for t in tables)
    ]


# --- modes -----------------------------------------------------------------------------------


def test_incremental_batch_never_deletes(s3, state, settings, catalog):
    land_batch(s3, settings, FIRST, small_source(), source_timestamp="2026-01-01T00:00:00Z")
    run_batch(s3, state, settings, catalog, FIRST)
    # Only t1, described, and a new column: t2 and its columns are absent, not deleted.
    partial = [
        entity("Table", "db/s/t1", description="changed"),
        entity("Column", "db/s/t1/c1"),
        entity("Column", "db/s/t1/c3"),
    ]
    land_batch(
        s3,
        settings,
        SECOND,
        partial,
        mode="incremental",
        source_timestamp="2026-01-02T00:00:00Z",
    )

    diff, plan, checks, result = run_batch(s3, state, settings, catalog, SECOND)

    assert diff.mode == "incremental" and plan.header.mode == "incremental"
    assert (diff.creates, diff.updates, diff.unchanged, diff.deletes) == (1, 1, 1, 0)
    assert plan.header.deletes == 0 and plan.header.snapshot_entities == 8
    assert all(c.passed for c in checks)
    assert result.outcome == "published" and result.serial == 2 and result.succeeded == 2
    expected = identities(small_source()) | {("Column", f"{SOURCE}/db/s/t1/c3")}
    assert catalog_identities(catalog) == expected
    assert set(state.read_snapshot(SOURCE, 2).select("type_name", "qualified_name").rows()) == (
        expected
    )

    # The very same entities as a full batch are the whole truth: t2 and its columns go.
    land_batch(s3, settings, THIRD, partial, source_timestamp="2026-01-03T00:00:00Z")
    full = run_diff(s3, state, settings, THIRD.partition_key)
    assert full.mode == "full" and full.deletes == 6  # t2, t2/c1, t2/c2, db, s, t1/c2


# --- thresholds ------------------------------------------------------------------------------


def test_global_threshold_and_per_source_override(s3, state, settings, catalog):
    """Both sources lose 40% of their entities; only the one with a 50% override may."""
    for source, first, second in ((SOURCE, "a-1", "a-2"), (OTHER, "b-1", "b-2")):
        land_batch(s3, settings, RunRef("test", "wf", first), ten(source), source)
        run_batch(s3, state, settings, catalog, RunRef("test", "wf", first))
        land_batch(
            s3,
            settings,
            RunRef("test", "wf", second),
            without_tables(ten(source), "t1", "t2"),
            source,
            source_timestamp="2026-01-02T00:00:00Z",
        )
    strict = settings.model_copy(
        update={"deletion_threshold": 0.3, "deletion_thresholds": {SOURCE: 0.5}}
    )

    verdicts = {}
    for source, second in ((SOURCE, "a-2"), (OTHER, "b-2")):
        key = f"test/wf/{second}"
        run_diff(s3, state, strict, key)
        _, plan, checks = run_plan(state, strict, key, catalog)
        safety = next(c for c in checks if c.name == "deletion_safety")
        assert safety.blocking and safety.metadata["deletion_share"] == 0.4
        assert plan.header.deletion_threshold == safety.metadata["threshold"]
        verdicts[source] = (safety.passed, safety.metadata["threshold"])
    assert verdicts == {SOURCE: (True, 0.5), OTHER: (False, 0.3)}


def test_thresholds_are_configured_from_the_environment(monkeypatch):
    monkeypatch.setenv("PUBLISH_PLATFORM_DELETION_THRESHOLD", "0.2")
    monkeypatch.setenv("PUBLISH_PLATFORM_DELETION_THRESHOLDS", json.dumps({SOURCE: 0.8}))
    configured = load_settings()
    assert configured.deletion_threshold_for(SOURCE) == 0.8
    assert configured.deletion_threshold_for(OTHER) == 0.2
    monkeypatch.setenv("PUBLISH_PLATFORM_DELETION_THRESHOLD", "1.5")
    with pytest.raises(ValueError):
        load_settings()


def test_a_per_source_threshold_out_of_range_is_refused(monkeypatch):
    monkeypatch.setenv("PUBLISH_PLATFORM_DELETION_THRESHOLDS", json.dumps({SOURCE: -0.1}))
    with pytest.raises(ValueError):
        load_settings()


# --- held until approved, through Dagster ----------------------------------------------------


def _plan_metadata(result) -> dict:
    (materialization,) = result.asset_materializations_for_node("plan")
    return {k: v.value for k, v in materialization.metadata.items()}


def _deletion_check(result):
    (evaluation,) = [
        e for e in result.get_asset_check_evaluations() if e.check_name == "deletion_safety"
    ]
    return evaluation


def _state(instance: DagsterInstance, settings, key: str):
    (batch_state,) = derive_states(instance, settings.landing, [key])
    return batch_state


def test_batch_deleting_60_percent_is_held_until_approved(s3, state, settings, catalog):
    land_batch(s3, settings, FIRST, ten(), source_timestamp="2026-01-01T00:00:00Z")
    run_batch(s3, state, settings, catalog, FIRST)
    kept = without_tables(ten(), "t2", "t3", "t4")  # 6 of 10 deleted
    land_batch(s3, settings, SECOND, kept, source_timestamp="2026-01-02T00:00:00Z")
    key = SECOND.partition_key
    job = defs.resolve_job_def("publish_batch")

    with instance_for_test() as instance:
        instance.add_dynamic_partitions("workflow_runs", [key])

        held = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)

        assert not held.success
        assert held.asset_materializations_for_node("publish") == []
        assert "publish" not in {e.step_key for e in held.get_step_success_events()}
        check = _deletion_check(held)
        assert not check.passed and check.blocking
        assert "batch deletes 60% of default/test/1 (threshold 50%)" in check.description
        assert _plan_metadata(held)["approved_by"] == ""
        assert catalog_identities(catalog) == identities(ten())
        assert state.current_serial(SOURCE) == 1
        held_state = _state(instance, settings, key)
        assert held_state.status == PublishStatus.HELD
        assert held_state.failure_details.error_type == "blocking_check_failed"
        assert "held for an operator's approval" in held_state.failure_details.message

        approval = {"approve_deletions": True, "approved_by": "alice", "reason": "table drop"}
        approved = job.execute_in_process(
            partition_key=key,
            instance=instance,
            raise_on_error=False,
            run_config={"ops": {"plan": {"config": approval}}},
        )

        assert approved.success
        metadata = _plan_metadata(approved)
        assert (metadata["approved_by"], metadata["approval_reason"]) == ("alice", "table drop")
        check = _deletion_check(approved)
        assert check.passed and check.metadata["approved_by"].value == "alice"
        assert "approved by alice (table drop)" in check.description
        (published,) = approved.asset_materializations_for_node("publish")
        assert published.metadata["outcome"].value == "published"
        assert catalog_identities(catalog) == identities(kept)
        assert state.current_serial(SOURCE) == 2
        done = _state(instance, settings, key)
        assert done.status == PublishStatus.COMPLETE and done.snapshot_serial == 2
        assert done.metrics.deletes == 6 and done.attempts == 2

    header = read_plan(state, key).header
    assert header.approval is not None
    assert (header.approval.approved_by, header.approval.reason) == ("alice", "table drop")
    stored = state.get_bytes(state.batch_key(key, "plan.json"))[0]
    assert json.loads(stored)["approval"]["approved_by"] == "alice"


def test_a_plan_held_when_replanned_at_publish_waits_for_approval(s3, state, settings, catalog):
    """Batch A (newest data, 2 of 10 deleted) was planned on serial 1; then B, older data with
    20 more entities, published serial 2. Re-planned on serial 2, A deletes 73%: held. Neither
    the re-plan nor any retry of the publish step applies it; approval does."""
    land_batch(s3, settings, FIRST, ten(), source_timestamp="2026-01-01T00:00:00Z")
    run_batch(s3, state, settings, catalog, FIRST)
    newest = without_tables(ten(), "t4")
    land_batch(s3, settings, THIRD, newest, source_timestamp="2026-01-03T00:00:00Z")
    more = [entity("Table", f"db/s/x{i}") for i in range(10)]
    more += [entity("Column", f"db/s/x{i}/c") for i in range(10)]
    land_batch(s3, settings, SECOND, ten() + more, source_timestamp="2026-01-02T00:00:00Z")
    key = THIRD.partition_key
    run_diff(s3, state, settings, key)
    _, plan, checks = run_plan(state, settings, key, catalog)
    assert plan.header.deletes == 2 and all(c.passed for c in checks)
    run_batch(s3, state, settings, catalog, SECOND)
    assert state.current_serial(SOURCE) == 2 and len(catalog_identities(catalog)) == 30
    job = defs.resolve_job_def("publish_batch")

    with instance_for_test() as instance:
        instance.add_dynamic_partitions("workflow_runs", [key])
        replanned = job.execute_in_process(
            partition_key=key,
            instance=instance,
            asset_selection=[AssetKey("publish")],
            raise_on_error=False,
        )
        assert not replanned.success
        held = _state(instance, settings, key)
        assert held.status == PublishStatus.HELD
        assert (held.failure_details.step, held.failure_details.error_type) == (
            "publish",
            "PlanHeldError",
        )
        assert "batch deletes 73% of default/test/1" in held.failure_details.message
        stored = read_plan(state, key).header
        assert stored.base_serial == 2 and stored.deletes == 22 and stored.approval is None

        # A retry of the publish step (what it runs) finds the stored plan current: still held.
        with pytest.raises(PlanHeldError, match="batch deletes 73%"):
            publish_with_replan(s3, state, settings, catalog, key)
        assert state.current_serial(SOURCE) == 2 and len(catalog_identities(catalog)) == 30

    # Approved (as the plan step does with the launchpad's or the CLI's approval), it publishes.
    run_diff(s3, state, settings, key)
    _, _, checks = run_plan(state, settings, key, catalog, Approval(approved_by="bob"))
    assert all(c.passed for c in checks)
    assert read_plan(state, key).header.approval.approved_by == "bob"
    assert run_publish(state, settings, catalog, key).serial == 3
    assert catalog_identities(catalog) == identities(newest)


def test_approval_needs_an_approver():
    assert PlanConfig().approval() is None
    approval = PlanConfig(approve_deletions=True, approved_by="alice", reason="r").approval()
    assert (approval.approved_by, approval.reason) == ("alice", "r")
    with pytest.raises(Failure, match="approve_deletions needs approved_by"):
        PlanConfig(approve_deletions=True).approval()


def test_an_approval_covers_only_the_deletions_approved(s3, state, settings, catalog):
    """Approved for 6 deletions, a re-plan that deletes more is held again; as many passes."""
    land_batch(s3, settings, FIRST, ten(), source_timestamp="2026-01-01T00:00:00Z")
    run_batch(s3, state, settings, catalog, FIRST)
    key = THIRD.partition_key
    land_batch(
        s3,
        settings,
        THIRD,
        without_tables(ten(), "t1", "t2", "t3"),
        source_timestamp="2026-01-03T00:00:00Z",
    )
    run_diff(s3, state, settings, key)
    _, plan, checks = run_plan(state, settings, key, catalog, Approval(approved_by="carol"))
    approved = next(c for c in checks if c.name == "deletion_safety")
    assert approved.passed and plan.header.approval.deletes == plan.header.deletes

    bigger = plan.header.approval.model_copy(update={"deletes": plan.header.deletes - 1})
    _, _, checks = run_plan(state, settings, key, catalog, bigger)
    held = next(c for c in checks if c.name == "deletion_safety")
    assert not held.passed
    assert f"the plan now deletes {plan.header.deletes}: held again" in held.description
