"""The three steps of a batch — diff, plan, publish — over S3, the state store and a metastore.

Each step reads what the previous one stored in the state store and stores its own result there,
so any step can be re-run alone (a re-materialization in Dagster) and a crash loses nothing.
The Dagster assets in ``publish_platform.defs`` are thin wrappers around these functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import polars as pl
from pydantic import BaseModel, Field

from publish_platform.config import Settings
from publish_platform.diff import (
    DIFF_SCHEMA,
    DiffResult,
    SnapshotView,
    derive_source,
    diff_batch,
    open_snapshot,
    read_changes,
    recognisable,
)
from publish_platform.entities import FILLED, EntityIssue
from publish_platform.landing import BatchProblem, RunRef, parse_batch, read_batch
from publish_platform.metastores.base import Metastore
from publish_platform.plan import (
    ISOLATED_SCHEMA,
    Approval,
    CheckOutcome,
    ExistsLookup,
    Plan,
    PlanHeader,
    blocking_checks,
    blocking_failures,
    build_plan,
    evaluate_checks,
    plan_id,
)
from publish_platform.publish import (
    RESULT_SCHEMA,
    Progress,
    RetryObserver,
    execute_plan,
    next_snapshot,
)
from publish_platform.retries import retry_tiers
from publish_platform.scratch import ScratchFolder
from publish_platform.state import (
    ChunkCheckpoint,
    Pointer,
    StaleStateError,
    StateStore,
    empty_snapshot,
    frame_parquet,
    scan_snapshot,
    snapshot_parquet,
)

Outcome = Literal["diffed", "quarantined", "skipped", "superseded"]
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
    outcome: Literal["published", "nothing_to_publish", "not_publishable", "superseded"]
    source: str | None = None
    replanned: bool = False
    resumed: int = 0
    immediate_retries: int = 0
    serial: int | None = None
    snapshot_key: str | None = None
    operations: int = 0
    succeeded: int = 0
    failed: int = 0
    requests: int = 0
    split_chunks: int = 0
    snapshot_entities: int = 0
    snapshot_relationships: int = 0
    landed_at: datetime | None = None
    failures_preview: list[dict[str, Any]] = Field(default_factory=list)
    duration_s: float = 0.0


def run_diff(
    s3: Any, state: StateStore, settings: Settings, partition_key: str, force: bool = False
) -> DiffSummary:
    # The batch's entity JSON waits in a scratch folder until diff.parquet is written: a large
    # batch's (a source's first) would not fit in memory.
    with ScratchFolder("diff") as scratch:
        return _run_diff(s3, state, settings, partition_key, force, scratch)


def _run_diff(
    s3: Any, state: StateStore, settings: Settings, partition_key: str, force: bool, spill: Path
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
    # With the source known up front (the manifest), its snapshot is read first: lines it
    # recognises by raw hash are not parsed. (A republish re-sends everything: no shortcut.)
    pointer_read = summary.source is not None
    published = state.current_pointer(summary.source) if summary.source else None
    snapshot = None
    if not problems:
        known = None
        if published is not None and not force:
            snapshot = open_snapshot(state, summary.source, published.serial)
            known = recognisable(snapshot)
        # Each data file is streamed from S3 once, parsed and verified on the same read; a batch
        # that fails verification is quarantined below, and what was parsed of it discarded.
        parsed, problems = parse_batch(
            s3, batch, settings.volatile_attributes, known_raw=known, spill=spill
        )
        del known  # the raw-hash index serves the parse only: the diff reads rows by identity
    if parsed is not None and not problems:
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

    # One read of the source's pointer serves the staleness check and the base serial.
    if not pointer_read and summary.source:
        published = state.current_pointer(summary.source)
    if not problems and published is not None:
        superseded = supersession(published, summary.source_timestamp)
        if superseded is not None:
            problems.append(BatchProblem("superseded", superseded))

    if problems:
        kinds = {p.kind for p in problems}
        summary.outcome = (
            "superseded"
            if kinds == {"superseded"}
            else "skipped"
            if kinds == {"skipped"}
            else "quarantined"
        )
        summary.problems = [{"kind": p.kind, "message": p.message} for p in problems]
        _write_diff(state, summary, pl.DataFrame(schema=DIFF_SCHEMA), [])
        summary.duration_s = time.perf_counter() - started
        return summary

    assert parsed is not None and summary.source is not None
    base_serial = published.serial if published else 0
    if snapshot is None:
        snapshot = open_snapshot(state, summary.source, base_serial)
    diff = diff_batch(parsed, snapshot, summary.source, summary.mode, force=force)
    # What of the parsed lines the changes do not hold (their files, lines, connection; the
    # identities of the unchanged ones) is let go before the diff is written.
    del parsed
    record_diff(state, summary, diff, base_serial)
    summary.duration_s = time.perf_counter() - started
    return summary


def record_diff(
    state: StateStore, summary: DiffSummary, diff: DiffResult, base_serial: int
) -> None:
    """Fill the summary from a computed diff and store both (diff.json, diff.parquet, issues)."""
    summarize_diff(summary, diff, base_serial)
    with ScratchFolder("diff-write") as scratch:
        _write_diff(state, summary, diff.stored_changes(scratch), diff.issues)


def summarize_diff(summary: DiffSummary, diff: DiffResult, base_serial: int) -> None:
    """What the plan step needs of a diff besides its changes: counts, mode, base serial."""
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


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def supersession(published: Pointer | None, source_timestamp: datetime | None) -> str | None:
    """Why a batch is superseded: its data is older than what is published for its source."""
    if published is None or source_timestamp is None or published.source_timestamp is None:
        return None
    if _utc(source_timestamp) < _utc(published.source_timestamp):
        return (
            f"source timestamp {_utc(source_timestamp).isoformat()} is older than"
            f" {_utc(published.source_timestamp).isoformat()}, already published for"
            f" {published.source} (serial {published.serial}, batch {published.partition_key})"
        )
    return None


def _write_diff(
    state: StateStore,
    summary: DiffSummary,
    changes: pl.DataFrame | pl.LazyFrame,
    issues: list[EntityIssue],
) -> None:
    key = summary.partition_key
    state.put_frame(state.batch_key(key, "diff.parquet"), changes)
    # Every isolated line is kept, with its reason: nothing is dropped silently.
    state.put_bytes(
        state.batch_key(key, "issues.jsonl"),
        b"".join(orjson.dumps(i.as_dict()) + b"\n" for i in issues),
    )
    state.put_bytes(state.batch_key(key, "diff.json"), summary.model_dump_json(indent=2).encode())


def read_diff_summary(state: StateStore, partition_key: str) -> DiffSummary:
    found = state.get_bytes(state.batch_key(partition_key, "diff.json"))
    if found is None:
        raise FileNotFoundError(f"no diff stored for {partition_key}: materialize diff first")
    return DiffSummary.model_validate_json(found[0])


def read_diff(state: StateStore, partition_key: str) -> tuple[DiffSummary, pl.DataFrame]:
    """The stored diff, its changes in memory (the plan step streams them instead)."""
    summary = read_diff_summary(state, partition_key)
    return summary, state.get_frame(state.batch_key(partition_key, "diff.parquet"))


# --- plan ------------------------------------------------------------------------------------


def run_plan(
    state: StateStore,
    settings: Settings,
    partition_key: str,
    metastore: Metastore | None = None,
    approval: Approval | None = None,
) -> tuple[DiffSummary, Plan, list[CheckOutcome]]:
    """Order the diff into a plan, store it, and evaluate the plan checks.

    ``metastore`` resolves references to entities outside batch and snapshot; ``approval`` is an
    operator's go-ahead for a batch that the deletion-safety check would hold. The plan returned
    scans its operations, without their JSON, references, hashes and guids (FILLED), from a
    local copy of plan.parquet that lives as long as it does (``read_plan`` has it all).
    """
    folder = ScratchFolder("plan")
    try:
        summary, plan, checks = _run_plan(
            state, settings, partition_key, metastore, approval, folder.path
        )
    except BaseException:
        folder.cleanup()
        raise
    plan.keep = (plan.keep, folder)
    return summary, plan, checks


def _run_plan(
    state: StateStore,
    settings: Settings,
    partition_key: str,
    metastore: Metastore | None,
    approval: Approval | None,
    scratch: Path,
) -> tuple[DiffSummary, Plan, list[CheckOutcome]]:
    summary = read_diff_summary(state, partition_key)
    diff_file = state.download(
        state.batch_key(partition_key, "diff.parquet"), scratch / "diff.parquet"
    )
    source = summary.source or ""
    # A batch that was not diffed (quarantined, skipped, superseded) gets an empty plan, checked
    # all the same.
    snapshot = (
        open_snapshot(state, source, summary.base_serial)
        if summary.outcome == "diffed"
        else SnapshotView(empty_snapshot())
    )
    planned = plan_diff(
        summary,
        diff_file,
        snapshot,
        settings.deletion_threshold_for(source),
        approval,
        metastore.existing if metastore is not None else None,
        scratch,
    )
    plan = planned.plan
    write_plan(state, plan, planned.operations)
    plan.operations = plan.operations.drop(FILLED)
    return summary, plan, planned.checks


@dataclass
class PlannedBatch:
    """A plan as the plan step computed it, before it is stored."""

    plan: Plan
    operations: Path  # the plan's file: its operations with their JSON
    checks: list[CheckOutcome]
    checks_s: float  # of the step's time, what the checks took


def plan_diff(
    summary: DiffSummary,
    diff_file: Path,
    snapshot: SnapshotView,
    threshold: float,
    approval: Approval | None,
    exists: ExistsLookup | None,
    scratch: Path,
) -> PlannedBatch:
    """The plan step's work on a local diff file (the step downloads it; the benchmark has it):
    the changes ordered into a plan, its operations streamed with their JSON into a file in
    ``scratch``, and that file checked. ``exists`` finds references outside batch and snapshot
    in the metastore."""
    # Scanned, not held: each pass the plan makes over the changes (their required attributes,
    # references, order, counts) streams them from the file, and so does the plan's file.
    # (Listed by earlier versions, unchanged entities are not operations.)
    changes = read_changes(diff_file).filter(pl.col("op") != "unchanged")
    diff = DiffResult(
        source=summary.source or "",
        mode=summary.mode,
        changes=changes,
        lines=summary.lines,
        valid_entities=summary.valid_entities,
        snapshot_entities=snapshot.entities,
        deletions_withheld=summary.deletions_withheld,
        unchanged=summary.unchanged,
    )
    plan = build_plan(
        diff,
        summary.partition_key,
        base_serial=summary.base_serial,
        source_timestamp=summary.source_timestamp,
        forced=summary.forced,
        snapshot=snapshot,
        exists=exists,
    )
    del diff
    plan.header.isolated += summary.isolated
    plan.header.deletion_threshold = threshold
    if approval is not None and approval.deletes is None:
        approval = approval.model_copy(update={"deletes": plan.header.deletes})
    operations = scratch / "plan.parquet"
    frame_parquet(plan.stored_operations(scratch / "plan-parts"), operations)
    # From here on the plan is its file (the same operations, with their JSON): what the checks
    # and the plan id read.
    stored = pl.scan_parquet(operations)
    plan.operations = stored.with_columns(entity_row=pl.lit(None, pl.UInt32))
    plan.header.plan_id = plan_id(summary.base_serial, stored)
    checking = time.perf_counter()
    checks = evaluate_checks(plan, stored, snapshot, threshold, approval)
    checks_s = time.perf_counter() - checking
    if approval is not None and any(
        c.name == "deletion_safety" and "approved_by" in c.metadata for c in checks
    ):
        plan.header.approval = approval
    return PlannedBatch(plan, operations, checks, checks_s)


def write_plan(state: StateStore, plan: Plan, operations: Path) -> None:
    """Store a plan: its operations' file (``Plan.stored_operations``), what it isolated, and
    its header, last: a plan.json says the rest is there."""
    key = plan.header.partition_key
    state.put_file(state.batch_key(key, "plan.parquet"), operations)
    state.put_bytes(
        state.batch_key(key, "plan-isolated.jsonl"),
        b"".join(orjson.dumps(row) + b"\n" for row in plan.isolated.iter_rows(named=True)),
    )
    state.put_bytes(
        state.batch_key(key, "plan.json"), plan.header.model_dump_json(indent=2).encode()
    )


def read_plan_header(state: StateStore, partition_key: str) -> PlanHeader:
    found = state.get_bytes(state.batch_key(partition_key, "plan.json"))
    if found is None:
        raise FileNotFoundError(f"no plan stored for {partition_key}: materialize plan first")
    return PlanHeader.model_validate_json(found[0])


def read_plan(state: StateStore, partition_key: str) -> Plan:
    """The whole stored plan, in memory (the publish step streams its operations instead)."""
    header = read_plan_header(state, partition_key)
    operations = state.get_frame(state.batch_key(partition_key, "plan.parquet"))
    isolated_raw = state.get_bytes(state.batch_key(partition_key, "plan-isolated.jsonl"))
    rows = [orjson.loads(line) for line in (isolated_raw[0] if isolated_raw else b"").splitlines()]
    isolated = pl.DataFrame(rows, schema=ISOLATED_SCHEMA)
    return Plan(header=header, operations=operations, isolated=isolated)


# --- publish ---------------------------------------------------------------------------------


class StalePlanError(StaleStateError):
    """The plan was computed against a serial that is no longer current: re-plan."""


class PlanHeldError(RuntimeError):
    """The plan to publish fails a blocking check: the batch waits for an operator."""


def run_publish(
    state: StateStore,
    settings: Settings,
    metastore: Metastore,
    partition_key: str,
    progress: Progress | None = None,
    on_retry: RetryObserver | None = None,
) -> PublishSummary:
    """Apply the stored plan, then write the next snapshot and advance the pointer (CAS).

    Progress is checkpointed per chunk, so a publish that died (even by kill -9) resumes where
    it stopped when run again; upserts and deletes are idempotent by identity, so a chunk that
    was applied but not yet checkpointed is harmlessly applied twice.
    """
    started = time.perf_counter()
    summary = read_diff_summary(state, partition_key)
    result = PublishSummary(
        partition_key=partition_key,
        outcome="not_publishable",
        source=summary.source,
        landed_at=summary.landed_at,
    )
    if summary.outcome != "diffed":
        result.outcome = "superseded" if summary.outcome == "superseded" else "not_publishable"
        result.duration_s = time.perf_counter() - started
        return result
    header = read_plan_header(state, partition_key)
    source = header.source
    published = state.current_pointer(source)
    current = published.serial if published else 0
    if current != header.base_serial:
        raise StalePlanError(
            f"plan for {partition_key} was computed against serial {header.base_serial} of"
            f" {source}, which is now at {current}: re-plan"
        )
    superseded = supersession(published, header.source_timestamp)
    if superseded is not None:
        result.outcome = "superseded"
        result.duration_s = time.perf_counter() - started
        return result
    result.serial = current
    # The plan and the base snapshot as files, streamed: neither is held whole (a large
    # source's take gigabytes).
    with ScratchFolder("publish") as folder:
        operations = pl.scan_parquet(
            state.download(state.batch_key(partition_key, "plan.parquet"), folder / "plan.parquet")
        )
        result.operations = operations.select(pl.len()).collect().item()
        if result.operations == 0:
            result.outcome = "nothing_to_publish"
            _advance_watermark(state, published, header, partition_key)
            result.duration_s = time.perf_counter() - started
            return result
        # The blocking checks again, on the stored plan: whatever runs this step (a retry of
        # the step alone, a re-execution from failure, the CLI), a held plan is never applied
        # unless the approval recorded with it lets it through.
        threshold = settings.deletion_threshold_for(source)
        held = blocking_failures(blocking_checks(header, operations, threshold, header.approval))
        if held:
            raise PlanHeldError(
                f"plan for {partition_key} fails blocking checks: "
                + "; ".join(c.description for c in held)
            )

        base = state.download_snapshot(source, current, folder)
        checkpoint = ChunkCheckpoint(state, partition_key, header.plan_id, RESULT_SCHEMA)
        outcome = execute_plan(
            operations,
            metastore,
            settings.publish_chunk_size,
            settings.purge_deletes,
            progress,
            checkpoint,
            retry_tiers(),
            on_retry,
            source,
            spill=folder / "results",
        )
        serial = current + 1
        rows = scan_snapshot(base, payload=True) if base else empty_snapshot()
        snapshot = folder / "next.parquet"
        snapshot_parquet(next_snapshot(rows, operations, outcome.results), snapshot)
        snapshot_key = state.write_snapshot(source, serial, snapshot, header.plan_id)
        entities, relationships = (
            scan_snapshot(snapshot)
            .select(pl.len(), pl.col("references").list.len().sum())
            .collect(engine="streaming")
            .row(0)
        )
        # (Read while the results' files are there: they go with the folder.)
        result.succeeded, result.failed = outcome.succeeded, outcome.failed
        failed = outcome.results.lazy().filter(~pl.col("ok")).head(ISSUE_PREVIEW).collect()
        result.failures_preview = (
            operations.filter(pl.col("seq").is_in(failed.get_column("seq").implode()))
            .select("seq", "type_name", "qualified_name")
            .collect()
            .join(failed, on="seq")
            .select("type_name", "qualified_name", "error")
            .to_dicts()
        )
    state.advance_pointer(
        Pointer(
            source=source,
            serial=serial,
            snapshot_key=snapshot_key,
            partition_key=partition_key,
            source_timestamp=header.source_timestamp,
            published_at=datetime.now(UTC),
            entities=entities,
        ),
        expected_serial=current,
    )
    result.outcome = "published"
    result.serial = serial
    result.snapshot_key = state.url(snapshot_key)
    result.requests = outcome.requests
    result.split_chunks = outcome.split_chunks
    result.resumed = outcome.resumed
    result.immediate_retries = outcome.immediate_retries
    result.snapshot_entities = entities
    result.snapshot_relationships = int(relationships or 0)
    result.duration_s = time.perf_counter() - started
    return result


def _advance_watermark(
    state: StateStore, current: Pointer | None, header: PlanHeader, partition_key: str
) -> None:
    """A batch with nothing to change still proves the source's state as of its timestamp:
    commit that (same snapshot, next serial), so that older batches landing later are
    superseded. Zero metastore writes; one state-store commit."""
    stamp = header.source_timestamp
    if current is None or stamp is None:
        return
    if current.source_timestamp is not None and _utc(stamp) <= _utc(current.source_timestamp):
        return
    state.advance_pointer(
        current.model_copy(
            update={
                "serial": current.serial + 1,
                "partition_key": partition_key,
                "source_timestamp": stamp,
                "published_at": datetime.now(UTC),
            }
        ),
        expected_serial=current.serial,
    )


def publish_with_replan(
    s3: Any,
    state: StateStore,
    settings: Settings,
    metastore: Metastore,
    partition_key: str,
    progress: Progress | None = None,
    approval: Approval | None = None,
    on_retry: RetryObserver | None = None,
) -> PublishSummary:
    """Publish; a plan gone stale (its source moved on) is refused, re-planned and re-checked."""
    try:
        return run_publish(state, settings, metastore, partition_key, progress, on_retry)
    except StalePlanError:
        previous = read_diff_summary(state, partition_key)
        approval = approval or read_plan_header(state, partition_key).approval
        run_diff(s3, state, settings, partition_key, force=previous.forced)
        _, _, checks = run_plan(state, settings, partition_key, metastore, approval)
        held = blocking_failures(checks)
        if held:
            raise PlanHeldError(
                "re-planned against the current snapshot, the plan fails blocking checks: "
                + "; ".join(c.description for c in held)
            ) from None
        result = run_publish(state, settings, metastore, partition_key, progress, on_retry)
        result.replanned = True
        return result
