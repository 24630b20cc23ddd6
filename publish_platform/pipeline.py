"""The three steps of a batch — diff, plan, publish — over S3, the state store and a metastore.

Each step reads what the previous one stored in the state store and stores its own result there,
so any step can be re-run alone (a re-materialization in Dagster) and a crash loses nothing.
The Dagster assets in ``publish_platform.defs`` are thin wrappers around these functions.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import polars as pl
from pydantic import BaseModel, Field

from publish_platform.config import Settings
from publish_platform.diff import DIFF_SCHEMA, derive_source, diff_batch
from publish_platform.entities import EntityIssue, parse_files
from publish_platform.landing import BatchProblem, RunRef, read_batch
from publish_platform.metastores.base import Metastore
from publish_platform.plan import (
    CheckOutcome,
    Plan,
    PlanHeader,
    build_plan,
    check_deletion_safety,
    check_references,
    check_required_attributes,
    check_scope,
)
from publish_platform.publish import Progress, execute_plan, next_snapshot
from publish_platform.state import Pointer, StaleStateError, StateStore, empty_snapshot

Outcome = Literal["diffed", "quarantined", "skipped"]
ISSUE_PREVIEW = 20


class DiffSummary(BaseModel):
    """diff.json: what the diff step found, and whether the batch can go on."""

    partition_key: str
    outcome: Outcome
    problems: list[dict[str, str]] = Field(default_factory=list)
    source: str | None = None
    mode: Literal["full", "incremental"] = "full"
    base_serial: int = 0
    source_timestamp: datetime | None = None
    landed_at: datetime | None = None
    files: int = 0
    lines: int = 0
    valid_entities: int = 0
    creates: int = 0
    updates: int = 0
    deletes: int = 0
    unchanged: int = 0
    isolated: int = 0
    issue_counts: dict[str, int] = Field(default_factory=dict)
    issues_preview: list[dict[str, Any]] = Field(default_factory=list)
    deletions_withheld: str | None = None
    forced: bool = False
    duration_s: float = 0.0


class PublishSummary(BaseModel):
    """What the publish step did."""

    partition_key: str
    outcome: Literal["published", "nothing_to_publish", "not_publishable"]
    source: str | None = None
    serial: int | None = None
    snapshot_key: str | None = None
    operations: int = 0
    succeeded: int = 0
    failed: int = 0
    requests: int = 0
    split_chunks: int = 0
    snapshot_entities: int = 0
    failures_preview: list[dict[str, Any]] = Field(default_factory=list)
    duration_s: float = 0.0


def run_diff(
    s3: Any, state: StateStore, settings: Settings, partition_key: str, force: bool = False
) -> DiffSummary:
    started = time.perf_counter()
    run = RunRef.from_partition_key(partition_key)
    batch = read_batch(s3, settings.landing_location, run)
    summary = DiffSummary(
        partition_key=partition_key,
        outcome="diffed",
        landed_at=batch.landed_at,
        files=len(batch.files),
        forced=force,
    )
    if batch.manifest is not None:
        summary.source = batch.manifest.connection_qualified_name
        summary.mode = batch.manifest.mode
        summary.source_timestamp = batch.manifest.source_timestamp

    problems = list(batch.problems)
    parsed = None
    if not problems:
        parsed = parse_files(
            ((f.relative_key, f.data) for f in batch.files), settings.volatile_attributes
        )
        if summary.source is None:
            derived = derive_source(parsed)
            if isinstance(derived, str):
                summary.source = derived
            elif derived:
                problems.append(
                    BatchProblem(
                        "rejected_manifest",
                        "no publish-request.json and the data names several connections: "
                        + ", ".join(derived[:5]),
                    )
                )
            else:
                problems.append(BatchProblem("no_data", "no valid entity to derive a source from"))
        if summary.source_timestamp is None:
            # Without a manifest: when the connector read the source, else when the run landed.
            summary.source_timestamp = (
                datetime.fromtimestamp(parsed.last_sync_ms / 1000, UTC)
                if parsed.last_sync_ms
                else batch.landed_at
            )

    if problems:
        summary.outcome = "skipped" if all(p.kind == "skipped" for p in problems) else "quarantined"
        summary.problems = [{"kind": p.kind, "message": p.message} for p in problems]
        _write_diff(state, summary, pl.DataFrame(schema=DIFF_SCHEMA), [])
        summary.duration_s = time.perf_counter() - started
        return summary

    assert parsed is not None and summary.source is not None
    base_serial = state.current_serial(summary.source)
    snapshot = state.read_snapshot(summary.source, base_serial)
    diff = diff_batch(parsed, snapshot, summary.source, summary.mode, force=force)
    summary.base_serial = base_serial
    summary.lines = diff.lines
    summary.valid_entities = diff.valid_entities
    summary.creates = diff.count("create")
    summary.updates = diff.count("update")
    summary.deletes = diff.count("delete")
    summary.unchanged = diff.count("unchanged")
    summary.isolated = diff.isolated
    summary.issue_counts = diff.issue_counts()
    summary.issues_preview = [i.as_dict() for i in diff.issues[:ISSUE_PREVIEW]]
    summary.deletions_withheld = diff.deletions_withheld
    _write_diff(state, summary, diff.changes, diff.issues)
    summary.duration_s = time.perf_counter() - started
    return summary


def _write_diff(
    state: StateStore, summary: DiffSummary, changes: pl.DataFrame, issues: list[EntityIssue]
) -> None:
    key = summary.partition_key
    state.put_frame(state.batch_key(key, "diff.parquet"), changes)
    # Every isolated line is kept, with its reason: nothing is dropped silently.
    state.put_bytes(
        state.batch_key(key, "issues.jsonl"),
        b"".join(orjson.dumps(i.as_dict()) + b"\n" for i in issues),
    )
    state.put_bytes(state.batch_key(key, "diff.json"), summary.model_dump_json(indent=2).encode())


def read_diff(state: StateStore, partition_key: str) -> tuple[DiffSummary, pl.DataFrame]:
    found = state.get_bytes(state.batch_key(partition_key, "diff.json"))
    if found is None:
        raise FileNotFoundError(f"no diff stored for {partition_key}: materialize diff first")
    summary = DiffSummary.model_validate_json(found[0])
    return summary, state.get_frame(state.batch_key(partition_key, "diff.parquet"))


# --- plan ------------------------------------------------------------------------------------


def run_plan(
    state: StateStore, settings: Settings, partition_key: str
) -> tuple[DiffSummary, Plan, list[CheckOutcome]]:
    """Order the diff into a plan, store it, and evaluate the plan checks."""
    from publish_platform.diff import DiffResult

    summary, changes = read_diff(state, partition_key)
    source = summary.source or ""
    diff = DiffResult(
        source=source,
        mode=summary.mode,
        changes=changes,
        lines=summary.lines,
        valid_entities=summary.valid_entities,
        snapshot_entities=0,
        deletions_withheld=summary.deletions_withheld,
    )
    # A batch that was not diffed (quarantined, skipped) gets an empty plan, checked all the same.
    snapshot = (
        state.read_snapshot(source, summary.base_serial)
        if summary.outcome == "diffed"
        else empty_snapshot()
    )
    diff.snapshot_entities = snapshot.height
    plan = build_plan(
        diff,
        partition_key,
        base_serial=summary.base_serial,
        source_timestamp=summary.source_timestamp,
        forced=summary.forced,
    )
    plan.header.isolated = summary.isolated
    state.put_frame(state.batch_key(partition_key, "plan.parquet"), plan.operations)
    state.put_bytes(
        state.batch_key(partition_key, "plan.json"), plan.header.model_dump_json(indent=2).encode()
    )
    checks = [
        check_scope(plan),
        check_deletion_safety(plan, settings.deletion_threshold),
        check_references(plan, snapshot),
        check_required_attributes(plan),
    ]
    return summary, plan, checks


def read_plan(state: StateStore, partition_key: str) -> Plan:
    found = state.get_bytes(state.batch_key(partition_key, "plan.json"))
    if found is None:
        raise FileNotFoundError(f"no plan stored for {partition_key}: materialize plan first")
    header = PlanHeader.model_validate_json(found[0])
    return Plan(
        header=header, operations=state.get_frame(state.batch_key(partition_key, "plan.parquet"))
    )


# --- publish ---------------------------------------------------------------------------------


def run_publish(
    state: StateStore,
    settings: Settings,
    metastore: Metastore,
    partition_key: str,
    progress: Progress | None = None,
) -> PublishSummary:
    """Apply the stored plan, then write the next snapshot and advance the pointer (CAS)."""
    started = time.perf_counter()
    summary, _ = read_diff(state, partition_key)
    result = PublishSummary(
        partition_key=partition_key, outcome="not_publishable", source=summary.source
    )
    if summary.outcome != "diffed":
        result.duration_s = time.perf_counter() - started
        return result
    plan = read_plan(state, partition_key)
    source = plan.header.source
    current = state.current_serial(source)
    if current != plan.header.base_serial:
        raise StaleStateError(
            f"plan for {partition_key} was computed against serial {plan.header.base_serial} of"
            f" {source}, which is now at {current}: re-plan (re-materialize diff and plan)"
        )
    result.operations = plan.operations.height
    result.serial = current
    if plan.operations.height == 0:
        result.outcome = "nothing_to_publish"
        result.duration_s = time.perf_counter() - started
        return result

    outcome = execute_plan(
        plan.operations, metastore, settings.chunk_size, settings.purge_deletes, progress
    )
    base = state.read_snapshot(source, current)
    snapshot = next_snapshot(base, plan.operations, outcome.results)
    serial = current + 1
    snapshot_key = state.write_snapshot(source, serial, snapshot)
    state.advance_pointer(
        Pointer(
            source=source,
            serial=serial,
            snapshot_key=snapshot_key,
            partition_key=partition_key,
            source_timestamp=plan.header.source_timestamp,
            published_at=datetime.now(UTC),
            entities=snapshot.height,
        ),
        expected_serial=current,
    )
    result.outcome = "published"
    result.serial = serial
    result.snapshot_key = state.url(snapshot_key)
    result.succeeded = outcome.succeeded
    result.failed = outcome.failed
    result.requests = outcome.requests
    result.split_chunks = outcome.split_chunks
    result.snapshot_entities = snapshot.height
    result.failures_preview = outcome.errors[:ISSUE_PREVIEW]
    result.duration_s = time.perf_counter() - started
    return result
