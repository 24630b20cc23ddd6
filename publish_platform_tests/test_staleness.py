"""Staleness: a plan is pinned to the serial it was computed against, and a batch older than what
is published for its source is superseded, never published."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from dagster import instance_for_test

from publish_platform.defs import defs
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

OLDER = RunRef("test", "wf", "run-older")
NEWER = RunRef("test", "wf", "run-newer")
DAY_1, DAY_2 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"


def older_batch() -> list[dict]:
    return small_source()  # tables t1, t2


def newer_batch() -> list[dict]:
    """The source a day later: t2 dropped, t3 added, t1 described."""
    batch = [e for e in small_source() if "/t2" not in e["attributes"]["qualifiedName"]]
    batch = [
        entity("Table", "db/s/t1", description="newer") if e["attributes"]["name"] == "t1" else e
        for e in batch
    ]
    return [*batch, entity("Table", "db/s/t3"), entity("Column", "db/s/t3/c1")]


@pytest.fixture
def landed(s3, settings):
    """Both batches of the source landed; the newer one is processed first."""
    land_batch(s3, settings, OLDER, older_batch(), source_timestamp=DAY_1)
    land_batch(s3, settings, NEWER, newer_batch(), source_timestamp=DAY_2)


def assert_catalog_is_the_newer_batch(state, catalog) -> None:
    assert catalog_identities(catalog) == identities(newer_batch())
    t1 = next(e for e in catalog.dump(SOURCE) if e["attributes"]["qualifiedName"].endswith("/t1"))
    assert t1["attributes"]["description"] == "newer"
    assert set(catalog.versions(SOURCE).values()) == {1}  # the older batch wrote nothing
    pointer, _ = state.read_pointer(SOURCE)
    assert (pointer.serial, pointer.partition_key) == (1, NEWER.partition_key)
    assert pointer.source_timestamp == datetime(2026, 1, 2, tzinfo=UTC)
    assert [p.serial for p in state.history(SOURCE)] == [1]


def test_batches_landed_newest_first_publish_the_newest_and_supersede_the_older(
    landed, s3, state, settings, catalog
):
    *_, newer = run_batch(s3, state, settings, catalog, NEWER)
    assert newer.outcome == "published" and newer.serial == 1 and newer.succeeded == 7

    # The older batch goes through the Dagster job like any other.
    key = OLDER.partition_key
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("workflow_runs", [key])
        run = defs.resolve_job_def("publish_batch").execute_in_process(
            partition_key=key, instance=instance
        )
        (batch_state,) = derive_states(instance, settings.landing, [key])

    assert run.success
    outcomes = {
        name: materialization.metadata["outcome"].value
        for name in ("diff", "plan", "publish")
        for materialization in run.asset_materializations_for_node(name)
    }
    assert outcomes == {"diff": "superseded", "plan": "superseded", "publish": "superseded"}
    assert batch_state.status == PublishStatus.SUPERSEDED
    assert batch_state.failure_details.error_type == "superseded"
    diff, _ = read_diff(state, key)
    assert diff.outcome == "superseded"
    assert [p["kind"] for p in diff.problems] == ["superseded"]
    message = diff.problems[0]["message"]
    assert "2026-01-01T00:00:00+00:00 is older than 2026-01-02T00:00:00+00:00" in message
    assert NEWER.partition_key in message and "serial 1" in message
    assert message in batch_state.failure_details.message
    assert diff.creates == diff.updates == diff.deletes == 0
    plan = read_plan(state, key)
    assert plan.operations.height == 0
    assert all(e.passed for e in run.get_asset_check_evaluations())
    assert run_publish(state, settings, catalog, key).outcome == "superseded"

    assert_catalog_is_the_newer_batch(state, catalog)


def test_an_older_batch_planned_before_the_newer_published_is_refused_then_superseded(
    landed, s3, state, settings, catalog
):
    """Both were planned against serial 0 (nothing published yet); the newer one wins. The
    older one's plan is stale: refused, re-planned, and found superseded."""
    for run in (OLDER, NEWER):
        assert run_diff(s3, state, settings, run.partition_key).outcome == "diffed"
        run_plan(state, settings, run.partition_key, catalog)
    assert read_plan(state, OLDER.partition_key).header.base_serial == 0
    assert run_publish(state, settings, catalog, NEWER.partition_key).serial == 1

    with pytest.raises(StalePlanError, match="computed against serial 0 of default/test/1"):
        run_publish(state, settings, catalog, OLDER.partition_key)
    result = publish_with_replan(s3, state, settings, catalog, OLDER.partition_key)

    assert result.replanned and result.outcome == "superseded"
    assert result.succeeded == 0 and result.serial is None
    assert_catalog_is_the_newer_batch(state, catalog)


def test_batches_in_order_both_publish(landed, s3, state, settings, catalog):
    """The same two batches oldest first: each is published, the newer on top of the older."""
    *_, older = run_batch(s3, state, settings, catalog, OLDER)
    diff, plan, _, newer = run_batch(s3, state, settings, catalog, NEWER)

    assert older.serial == 1 and newer.serial == 2
    assert (diff.base_serial, diff.creates, diff.updates, diff.deletes) == (1, 2, 1, 3)
    assert plan.header.base_serial == 1
    assert catalog_identities(catalog) == identities(newer_batch())
    assert [p.partition_key for p in state.history(SOURCE)] == [
        OLDER.partition_key,
        NEWER.partition_key,
    ]


def test_an_older_batch_is_superseded_by_a_newer_one_that_changed_nothing(
    s3, state, settings, catalog
):
    land_batch(s3, settings, OLDER, older_batch(), source_timestamp=DAY_1)
    run_batch(s3, state, settings, catalog, OLDER)
    # Day 3: the source is as on day 1. Day 2's batch (t3 added, dropped again) lands late.
    day_3 = RunRef("test", "wf", "run-day-3")
    land_batch(s3, settings, day_3, older_batch(), source_timestamp="2026-01-03T00:00:00Z")
    assert run_batch(s3, state, settings, catalog, day_3)[3].outcome == "nothing_to_publish"
    land_batch(
        s3, settings, NEWER, [*older_batch(), entity("Table", "db/s/t3")], source_timestamp=DAY_2
    )

    assert run_diff(s3, state, settings, NEWER.partition_key).outcome == "superseded"
