"""Turn a diff into an ordered, checked plan.

Order: creates and updates parents first (Connection → Database → Schema → Table… → Column),
then deletes children first; within a type rank, in the order of the batch's lines. A diff
lists its changes in that order (``diff.plan_order``): the plan's entity JSON is written from
the diff's in one pass, and a large plan is not a sorted copy of its diff. The plan
pins the snapshot serial it was computed against, so it can only ever be applied on top of that
state.

Plan rules isolate what cannot be published — an entity without a required attribute, or with a
reference to an entity that exists neither in the batch, nor in the snapshot, nor in the
metastore (and, by cascade, whatever references an isolated new entity) — and derive the
relationship edges the plan adds, removes and re-points. Checks are pure functions of the plan:
the Dagster asset checks only report what they return.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from pydantic import BaseModel, Field

from publish_platform.diff import (
    CHANGES_SCHEMA,
    DIFF_SCHEMA,
    IDENTITY,
    DiffResult,
    Mode,
    SnapshotView,
    as_changes,
    as_view,
    plan_order,
)
from publish_platform.entities import (
    REQUIRED_ATTRIBUTES,
    missing_required,
    spilled_rows,
    with_entities,
)
from publish_platform.scratch import ScratchFolder

# A stored plan's operations; in memory they also have the diff's ``entity_row``.
PLAN_SCHEMA = {"seq": pl.Int64, **DIFF_SCHEMA}
EDGE = ["from_type", "from_qualified_name", "attribute"]
EDGE_SCHEMA = {
    "from_type": pl.String,
    "from_qualified_name": pl.String,
    "attribute": pl.String,
    "type_name": pl.String,
    "qualified_name": pl.String,
}
ISOLATED_SCHEMA = {**{k: pl.String for k in IDENTITY}, "reason": pl.String, "message": pl.String}

# Looks up which (typeName, qualifiedName) identities the metastore already has.
ExistsLookup = Callable[[list[tuple[str, str]]], set[tuple[str, str]]]


class Approval(BaseModel):
    """An operator's approval of a held batch, recorded with the plan and the run."""

    approved_by: str = Field(min_length=1)
    reason: str = ""
    approved_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # How many deletions were approved (set from the plan the operator saw): a re-plan that
    # deletes more is held again.
    deletes: int | None = None


class PlanHeader(BaseModel):
    """Everything about a plan but its operations; stored as plan.json beside plan.parquet."""

    partition_key: str
    source: str
    mode: Mode
    base_serial: int
    plan_id: str = ""  # of its stored operations (``plan_id``): set when the plan is stored
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source_timestamp: datetime | None = None
    creates: int = 0
    updates: int = 0
    deletes: int = 0
    unchanged: int = 0
    batch_entities: int = 0
    snapshot_entities: int = 0
    isolated: int = 0
    isolated_by_plan: int = 0
    relationships_added: int = 0
    relationships_removed: int = 0
    relationships_repointed: int = 0
    deletions_withheld: str | None = None
    deletion_threshold: float | None = None
    approval: Approval | None = None
    forced: bool = False

    @property
    def operations(self) -> int:
        return self.creates + self.updates + self.deletes


@dataclass
class Plan:
    header: PlanHeader
    # PLAN_SCHEMA and entity_row, in execution order: held, or (the plan step's) scanned from
    # its file, never held whole.
    operations: pl.DataFrame | pl.LazyFrame
    isolated: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ISOLATED_SCHEMA))
    # Lazy: a first batch's million new edges are counted and checked in a stream, not held.
    edges_added: pl.LazyFrame = field(default_factory=lambda: pl.LazyFrame(schema=EDGE_SCHEMA))
    edges_removed: pl.LazyFrame = field(default_factory=lambda: pl.LazyFrame(schema=EDGE_SCHEMA))
    # Where the JSON, references and hashes of operations with an ``entity_row`` are (the
    # diff's ``entities``).
    entities: pl.LazyFrame | None = field(default=None, repr=False)
    # What must live as long as the plan: the folders of the files it scans (its operations', its
    # edges').
    keep: object = field(default=None, repr=False)

    def stored_operations(self, scratch: Path) -> pl.LazyFrame:
        """The operations with their JSON, references and hashes (PLAN_SCHEMA), as stored: filled a
        chunk at a time into files in ``scratch`` (``entities.with_entities``), and scanned."""
        return with_entities(self.operations, self.entities, scratch).select(list(PLAN_SCHEMA))


def attribute(name: str) -> pl.Expr:
    """An attribute of the entity JSON, vectorized (null when absent or null)."""
    return pl.col("entity").str.json_path_match(f"$.attributes.{name}")


def build_plan(
    diff: DiffResult,
    partition_key: str,
    base_serial: int,
    source_timestamp: datetime | None = None,
    forced: bool = False,
    snapshot: pl.DataFrame | SnapshotView | None = None,
    exists: ExistsLookup | None = None,
) -> Plan:
    changes = as_changes(diff.changes)
    snapshot = snapshot if snapshot is not None else diff.snapshot
    if snapshot is None and diff.unchanged:
        # Unchanged entities are not listed in the diff: only the snapshot says they exist.
        raise ValueError("a plan of a diff with unchanged entities needs the diff's snapshot")
    snapshot = as_view(snapshot if snapshot is not None else pl.DataFrame(schema=DIFF_SCHEMA))
    upserts = changes.filter(pl.col("op").is_in(["create", "update"]))
    # Held: as many as the snapshot has rows at most, and most batches have few.
    deletes = _held(changes.filter(pl.col("op") == "delete"))

    upserts, isolated_required = _isolate_missing_required(upserts)
    references = _references(upserts, diff.entities)
    # Streamed: the few targets of a million references, and how many edges point at each,
    # without a table of them all (88 MB).
    per_target = (
        references.group_by(IDENTITY).agg(pl.len().alias("edges")).collect(engine="streaming")
    )
    targets = per_target.select(IDENTITY)
    known = _known_identities(targets, changes, snapshot, deletes, isolated_required)
    # What the metastore may still have but will not after this plan: never a valid target.
    doomed = pl.concat(
        [deletes.select(IDENTITY), isolated_required.select(IDENTITY)], how="vertical"
    )
    upserts, isolated_dangling, kept = _isolate_dangling(
        upserts, references, targets, known, exists, doomed
    )
    # Unless an entity was isolated, its references are the edges just counted.
    edges = int(per_target.get_column("edges").sum()) if kept is references else None
    references = kept
    isolated = pl.concat([isolated_required, isolated_dangling], how="vertical")

    ordered = upserts
    if deletes.height:  # (a first batch has none: no concat, which copied its creates)
        ordered = pl.concat(
            [upserts, _like(deletes.lazy(), upserts)],
            how="vertical",
            rechunk=True,  # later gathers then share the entity JSON instead of copying it
        )
    # (A diff lists them in order. Each change's place is a byte: a stream of them is checked,
    # not the operations and type names they are computed from.)
    if not _held(ordered.lazy().select(plan_order())).to_series().is_sorted():
        ordered = ordered.sort(plan_order(), maintain_order=True)
    operations = ordered.with_row_index("seq").select(pl.col("seq").cast(pl.Int64), *CHANGES_SCHEMA)
    added, removed, counts, edges_folder = _relationship_changes(
        operations, references, snapshot, edges, diff.entities
    )

    op = pl.col("op")
    # Counted, not filtered: a filter copies the rows it counts.
    creates, updates = _held(
        operations.lazy().select(
            (op == "create").sum().alias("creates"), (op == "update").sum().alias("updates")
        )
    ).row(0)
    header = PlanHeader(
        partition_key=partition_key,
        source=diff.source,
        mode=diff.mode,
        base_serial=base_serial,
        source_timestamp=source_timestamp,
        creates=creates,
        updates=updates,
        deletes=deletes.height,
        unchanged=diff.count("unchanged"),
        batch_entities=_held(changes.lazy().select(pl.len())).item()
        - deletes.height
        + diff.unchanged,
        snapshot_entities=diff.snapshot_entities,
        isolated=diff.isolated + isolated.height,
        isolated_by_plan=isolated.height,
        relationships_added=counts[0],
        relationships_removed=counts[1],
        relationships_repointed=counts[2],
        deletions_withheld=diff.deletions_withheld,
        forced=forced,
    )
    return Plan(
        header, operations, isolated, added, removed, entities=diff.entities, keep=edges_folder
    )


def plan_id(base_serial: int, operations: pl.LazyFrame) -> str:
    """Identifies a plan by content: the same batch on the same serial gives the same id, so a
    re-run after a crash finds the checkpoints of the plan it is resuming. ``operations``: as
    stored (``Plan.stored_operations``, or the plan's file scanned), where every operation has
    its hash: in memory, those read from a stored diff's do not."""
    digest = hashlib.blake2b(str(base_serial).encode(), digest_size=12)
    rows = operations.select(pl.len()).collect().item()
    for column in ("op", "type_name", "qualified_name", "hash"):
        # A slice at a time: the Python strings of a whole column of a large plan weigh GBs.
        for offset in range(0, rows, 100_000):
            part = operations.slice(offset, 100_000).select(column).collect().to_series()
            values = part.fill_null("").to_list()
            digest.update((b"\0" if offset else b"") + b"\0".join(v.encode() for v in values))
        digest.update(b"\1")
    return digest.hexdigest()


def _held(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """A frame in memory: a lazy one collected in a stream (what it selects of a scanned diff
    is read a part at a time)."""
    return frame.collect(engine="streaming") if isinstance(frame, pl.LazyFrame) else frame


def _like(frame: pl.LazyFrame, like: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame | pl.LazyFrame:
    """``frame`` held if ``like`` is, else lazy: a plan of held changes holds its operations,
    a plan of a scanned diff scans them."""
    return frame if isinstance(like, pl.LazyFrame) else frame.collect()


def _isolated(frame: pl.DataFrame, reason: str, message: pl.Expr) -> pl.DataFrame:
    return frame.select(*IDENTITY, reason=pl.lit(reason), message=message)


def missing_in_json(entities: pl.Series) -> pl.Series:
    """For each entity JSON, the required attributes it lacks ("" when none; null for a null):
    for changes whose lines were not checked when parsed (``missing`` not known)."""
    # A slice at a time: the Python strings of every changed entity at once outweigh the frame.
    found = [
        None if entity is None else missing_required(orjson.loads(entity))
        for offset in range(0, len(entities), 10_000)
        for entity in entities.slice(offset, 10_000).to_list()
    ]
    return pl.Series(found, dtype=pl.String)


def _isolate_missing_required(
    upserts: pl.DataFrame | pl.LazyFrame,
) -> tuple[pl.DataFrame | pl.LazyFrame, pl.DataFrame]:
    marked = upserts
    if _held(marked.lazy().select(pl.col("missing").null_count())).item():
        # Not known (an older diff's rows): their JSON is read, a batch of rows at a time.
        unknown = pl.col("entity").map_batches(missing_in_json, return_dtype=pl.String)
        marked = marked.with_columns(pl.col("missing").fill_null(unknown))
    # Still not known: a line recognised as its snapshot row, whose JSON is not read.
    marked = marked.with_columns(pl.col("missing").fill_null(""))
    bad = _held(marked.filter(pl.col("missing") != ""))
    isolated = _isolated(
        bad,
        "missing_required_attribute",
        pl.lit("missing required attribute(s): ") + pl.col("missing"),
    )
    return marked.filter(pl.col("missing") == ""), isolated


def _known_identities(
    targets: pl.DataFrame,
    changes: pl.DataFrame | pl.LazyFrame,
    snapshot: SnapshotView,
    deletes: pl.DataFrame,
    isolated: pl.DataFrame,
) -> pl.DataFrame:
    """Of the identities references point at (``targets``), those that will exist: in the
    batch or the snapshot, less deletions and new entities that are isolated. Only the targets
    are looked up: the union of batch and snapshot would cost a pass over a million rows."""
    new_isolated = _named_by(changes, pl.col("op") == "create", isolated.select(IDENTITY))
    in_batch = _named_by(changes, pl.col("op") != "delete", targets)
    in_snapshot = snapshot.exists(targets)
    return (
        pl.concat([in_batch, in_snapshot], how="vertical")
        .unique()
        .join(deletes.select(IDENTITY), on=IDENTITY, how="anti")
        .join(new_isolated.select(IDENTITY), on=IDENTITY, how="anti")
    )


def _named_by(
    changes: pl.DataFrame | pl.LazyFrame, rows: pl.Expr, identities: pl.DataFrame
) -> pl.DataFrame:
    """Those of ``identities`` (few) that ``changes`` has a row of among ``rows``. The batch
    streams past them: an eager join hashed every identity of a first batch (120 MB at 1M)."""
    return (
        changes.lazy()
        .filter(rows)
        .select(IDENTITY)
        .join(identities.lazy(), on=IDENTITY, how="semi")
        .collect(engine="streaming")
    )


def _references(
    frame: pl.DataFrame | pl.LazyFrame, entities: pl.LazyFrame | None = None
) -> pl.LazyFrame:
    """One row per reference edge of the given entities (EDGE_SCHEMA), to stream or collect:
    a first batch's table of edges (590 MB at 5M entities) is never needed whole. The
    references of a row with an ``entity_row`` are read from ``entities`` (SPILLED: a parse's
    spill, a stored diff), where they wait with its JSON."""
    row = pl.col("entity_row")
    waiting = (
        frame.lazy().select(row.drop_nulls()).collect().to_series()
        if entities is not None
        else pl.Series([], dtype=pl.UInt32)
    )
    if not waiting.len():
        return _edges(frame.lazy())
    held = _edges(frame.lazy().filter(row.is_null()))
    spilled = _edges(spilled_rows(entities, waiting))
    return pl.concat([held, spilled], how="vertical")


def _edges(frame: pl.LazyFrame) -> pl.LazyFrame:
    return (
        # (Selected first: the lazy frame holds these columns of a frame, not all of it.)
        frame.select(
            pl.col("type_name").alias("from_type"),
            pl.col("qualified_name").alias("from_qualified_name"),
            "references",
        )
        .explode("references")
        .drop_nulls("references")
        .unnest("references")
        .select(list(EDGE_SCHEMA))
    )


def _isolate_dangling(
    upserts: pl.DataFrame | pl.LazyFrame,
    references: pl.LazyFrame,
    targets: pl.DataFrame,
    known: pl.DataFrame,
    exists: ExistsLookup | None,
    doomed: pl.DataFrame,
) -> tuple[pl.DataFrame | pl.LazyFrame, pl.DataFrame, pl.LazyFrame]:
    """Isolate entities whose ``references`` (to the identities ``targets``) resolve
    nowhere, until nothing new dangles. Returns the upserts and the references left, and the
    isolated entities.

    The metastore is asked only about targets outside batch and snapshot: an entity this plan
    deletes (or does not publish) may still be in it, but will not be once the plan is applied.
    """
    unresolved = targets.join(known, on=IDENTITY, how="anti").join(doomed, on=IDENTITY, how="anti")
    if exists is not None and unresolved.height:
        found = exists([tuple(r) for r in unresolved.rows()])
        if found:
            known = pl.concat(
                [known, pl.DataFrame(sorted(found), schema=IDENTITY, orient="row")],
                how="vertical",
            )
    if not targets.join(known, on=IDENTITY, how="anti").height:
        # The usual case: nothing dangles, nothing to take out (a join would copy it all).
        return upserts, pl.DataFrame(schema=ISOLATED_SCHEMA), references
    # Streamed, each round: only the references that dangle are held, not the table of every
    # edge (590 MB at 5M), nor the identities of every create.
    source = ["from_type", "from_qualified_name"]
    isolated_from = pl.DataFrame(schema={name: pl.String for name in source})

    # (Filters, not anti-joins: a streamed join kept in order buffered every edge.)
    def left(refs: pl.LazyFrame) -> pl.LazyFrame:
        """``refs`` less those of the entities isolated so far."""
        return refs.filter(~_among(source, isolated_from))

    def dangling_of(refs: pl.LazyFrame) -> pl.DataFrame:
        return refs.filter(~_among(IDENTITY, known)).collect(engine="streaming")

    dangling = dangling_of(references)
    isolated_parts = []
    while dangling.height:
        first = dangling.group_by(*source, maintain_order=True).first()
        isolated_parts.append(
            first.select(
                pl.col("from_type").alias("type_name"),
                pl.col("from_qualified_name").alias("qualified_name"),
                reason=pl.lit("dangling_reference"),
                message=pl.format(
                    "{} references {} {}, which is in neither the batch, the snapshot nor the"
                    " metastore",
                    "attribute",
                    "type_name",
                    "qualified_name",
                ),
            )
        )
        isolated_from = pl.concat([isolated_from, first.select(source)], how="vertical")
        # A new entity that is isolated will not exist: what references it dangles in turn.
        gone = first.select(
            pl.col("from_type").alias("type_name"),
            pl.col("from_qualified_name").alias("qualified_name"),
        )
        new_gone = (
            upserts.lazy()
            .filter((pl.col("op") == "create") & _among(IDENTITY, gone))
            .select(IDENTITY)
            .collect(engine="streaming")
        )
        known = known.join(new_gone, on=IDENTITY, how="anti")
        dangling = dangling_of(left(references))
    isolated = pl.concat(isolated_parts, how="vertical")
    kept = upserts.lazy().filter(~_among(IDENTITY, isolated.select(IDENTITY)))
    return _like(kept, upserts), isolated, left(references)


def _among(columns: list[str], rows: pl.DataFrame) -> pl.Expr:
    """Whether a row's ``columns`` are one of ``rows`` (few, whose columns have those names):
    a filter keeps the order of what it streams, where a join kept in order buffered it all."""
    return pl.struct(columns).is_in(rows.select(pl.struct(columns)).to_series().implode())


# Operations whose old and new edges are compared at once: the edges of an entity are compared
# with its own only, so a plan that changes millions is compared a slice at a time (with them
# all at once, a 5M batch that changed most entities took 6.7 GB).
RELATIONSHIP_ROWS = 500_000


def _relationship_changes(
    operations: pl.DataFrame | pl.LazyFrame,
    new: pl.LazyFrame,
    snapshot: SnapshotView,
    new_count: int | None,
    entities: pl.LazyFrame | None,
) -> tuple[pl.LazyFrame, pl.LazyFrame, tuple[int, int, int], ScratchFolder | None]:
    """Edges added and removed by the plan (``new``: the references of its upserts, ``new_count``
    of them if known), how many are added, removed, and how many (from, attribute) pairs
    re-point; and the folder the edges of a plan of many slices are written to (``None``: held,
    or streamed)."""
    if not snapshot.entities:  # a source's first batch: every edge is new, counted in a stream
        count = new_count if new_count is not None else _count(new)
        return new, pl.LazyFrame(schema=EDGE_SCHEMA), (count, 0, 0), None
    total = _held(operations.lazy().select(pl.len())).item()
    folder = ScratchFolder("plan-edges") if total > RELATIONSHIP_ROWS else None
    # One slice: the new edges are ``new``'s, streamed; of many, each slice's are its own.
    edge_columns = ["references", "entity_row"] if folder is not None else []
    slices = (
        operations.lazy()
        .select(*IDENTITY, "op", *edge_columns)
        .collect_batches(chunk_size=RELATIONSHIP_ROWS)
    )
    added = removed = pl.DataFrame(schema=EDGE_SCHEMA)
    added_count = removed_count = repointed = 0
    for number, part in enumerate(slices):
        old = _references(snapshot.rows_of(part.select(IDENTITY))).collect()
        if folder is None:
            edges = new.collect()
        else:
            edges = _references(part.filter(pl.col("op") != "delete"), entities).collect()
        added = edges.join(old, on=list(EDGE_SCHEMA), how="anti")
        removed = old.join(edges, on=list(EDGE_SCHEMA), how="anti")
        del old, edges
        added_count += added.height
        removed_count += removed.height
        repointed += added.select(EDGE).unique().join(removed.select(EDGE).unique(), on=EDGE).height
        if folder is not None:
            added.write_parquet(folder.path / f"added-{number:05d}.parquet")
            removed.write_parquet(folder.path / f"removed-{number:05d}.parquet")
    counts = (added_count, removed_count, repointed)
    if folder is None:  # one slice, held
        return added.lazy(), removed.lazy(), counts, None
    return (
        pl.scan_parquet(folder.path / "added-*.parquet"),
        pl.scan_parquet(folder.path / "removed-*.parquet"),
        counts,
        folder,
    )


def _count(frame: pl.LazyFrame) -> int:
    return frame.select(pl.len()).collect(engine="streaming").item()


def preview(plan: Plan, limit: int = 20) -> str:
    """A short Markdown table of the first operations, for the Dagster UI."""
    ops = _held(plan.operations.lazy().head(limit))
    lines = ["| # | op | type | qualifiedName |", "|---|---|---|---|"]
    for row in ops.iter_rows(named=True):
        lines.append(
            f"| {row['seq']} | {row['op']} | {row['type_name']} | `{row['qualified_name']}` |"
        )
    more = plan.header.operations - ops.height
    if more > 0:
        lines.append(f"| … | {more} more | | |")
    if plan.header.operations == 0:
        lines.append("| | nothing to do | | |")
    header = plan.header
    lines.append("")
    lines.append(
        f"relationships: +{header.relationships_added} −{header.relationships_removed}"
        f" (re-pointed {header.relationships_repointed}); isolated by plan rules:"
        f" {header.isolated_by_plan}"
    )
    return "\n".join(lines)


# --- checks ----------------------------------------------------------------------------------


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _examples(frame: pl.DataFrame, limit: int = 5) -> list[list[Any]]:
    return [list(row) for row in frame.head(limit).rows()]


def check_scope(source: str, operations: pl.DataFrame | pl.LazyFrame) -> CheckOutcome:
    """Every operation touches the batch's own connection, by attribute and by namespace.
    ``operations`` may be a stored plan's file, scanned: it is read in a stream."""
    planned = operations.lazy()
    name = pl.col("qualified_name")
    outside_namespace = (name != source) & ~name.str.starts_with(source + "/")
    # Parsing every entity's JSON for its attribute took 13 s of a 5M first plan step (and
    # again of its publish step). A JSON text that has the key once, with the source as its
    # value, and no \u escape (that could spell the key), is within the source whatever the
    # key's depth: the plan's canonical JSON (``entities.canonical_json``) nearly always is. Only
    # the other entities are parsed.
    entity = pl.col("entity")
    key = '"connectionQualifiedName"'
    within = (
        (entity.str.count_matches(key, literal=True) == 1)
        & entity.str.contains(f"{key}:{orjson.dumps(source).decode()}", literal=True)
        & ~entity.str.contains("\\u", literal=True)
    ).fill_null(True)  # no JSON: no attribute to contradict the source
    doubtful = planned.filter(outside_namespace | ~within).select(*IDENTITY, "entity")
    outside = (
        doubtful.collect(engine="streaming")
        .filter(outside_namespace | (attribute("connectionQualifiedName") != source))
        .select(IDENTITY)
    )
    total = planned.select(pl.len()).collect().item()
    return CheckOutcome(
        name="scope",
        passed=outside.height == 0,
        blocking=True,
        description=(
            f"all {total} operations are within {source}"
            if outside.height == 0
            else f"{outside.height} operation(s) touch entities outside {source}"
        ),
        metadata={"out_of_scope": outside.height, "examples": _examples(outside)},
    )


def check_deletion_safety(
    header: PlanHeader, threshold: float, approval: Approval | None = None
) -> CheckOutcome:
    """Hold a batch that would delete too much of its source, or that is empty.

    An operator's approval lets a held batch through; the check then passes and records who
    approved it and why.
    """
    share = header.deletes / header.snapshot_entities if header.snapshot_entities else 0.0
    metadata: dict[str, Any] = {
        "deletes": header.deletes,
        "snapshot_entities": header.snapshot_entities,
        "deletion_share": round(share, 4),
        "threshold": threshold,
    }
    problem = None
    if header.mode == "full" and header.batch_entities == 0 and header.snapshot_entities > 0:
        problem = (
            f"empty full batch would delete all {header.snapshot_entities} entities of"
            f" {header.source}"
        )
    elif share > threshold:
        problem = f"batch deletes {share:.0%} of {header.source} (threshold {threshold:.0%})"
    if problem is None:
        return CheckOutcome(
            "deletion_safety",
            True,
            True,
            f"deletes {header.deletes} of {header.snapshot_entities} ({share:.0%}), within"
            f" {threshold:.0%}",
            metadata,
        )
    if approval is not None and approval.deletes is not None and header.deletes > approval.deletes:
        return CheckOutcome(
            "deletion_safety",
            False,
            True,
            f"{problem}: approved by {approval.approved_by} for {approval.deletes} deletions,"
            f" but the plan now deletes {header.deletes}: held again",
            metadata,
        )
    if approval is not None:
        metadata.update(
            approved_deletes=header.deletes,
            approved_by=approval.approved_by,
            approval_reason=approval.reason,
            approved_at=approval.approved_at.isoformat(),
        )
        return CheckOutcome(
            "deletion_safety",
            True,
            True,
            f"{problem}: approved by {approval.approved_by}"
            + (f" ({approval.reason})" if approval.reason else ""),
            metadata,
        )
    return CheckOutcome(
        "deletion_safety", False, True, f"{problem}: held for an operator's approval", metadata
    )


def check_references(plan: Plan, snapshot: pl.DataFrame | SnapshotView) -> CheckOutcome:
    """No planned entity references what will not exist; reports what the plan isolated."""
    # Streamed: a filter, or the table of every edge, would copy a first batch's creates.
    upserts = plan.operations.lazy().filter(pl.col("op") != "delete")
    # One stream over the edges: each target with how many reference it.
    per_target = (
        _references(upserts, plan.entities).group_by(IDENTITY).len().collect(engine="streaming")
    )
    references = int(per_target.get_column("len").sum())
    targets = per_target.select(IDENTITY)
    in_plan = upserts.select(IDENTITY).join(targets.lazy(), on=IDENTITY, how="semi")
    known = pl.concat(
        [in_plan.collect(engine="streaming"), as_view(snapshot).exists(targets)], how="vertical"
    ).unique()
    # Targets outside batch and snapshot were found in the metastore when the plan was built.
    isolated = plan.isolated.filter(pl.col("reason") == "dangling_reference")
    unresolved = targets.join(known, on=IDENTITY, how="anti")
    return CheckOutcome(
        name="references",
        passed=isolated.height == 0,
        blocking=False,
        description=(
            f"all {references} references resolve"
            if isolated.height == 0
            else f"{isolated.height} entities isolated for dangling references"
        ),
        metadata={
            "references": references,
            "isolated_dangling": isolated.height,
            "resolved_in_metastore": unresolved.height,
            "examples": _examples(isolated),
            "relationships_added": plan.header.relationships_added,
            "relationships_removed": plan.header.relationships_removed,
            "relationships_repointed": plan.header.relationships_repointed,
        },
    )


def check_required_attributes(plan: Plan) -> CheckOutcome:
    """No planned entity lacks qualifiedName, name or connection; reports what was isolated."""
    lacking = _held(
        plan.operations.lazy()
        .filter((pl.col("op") != "delete") & (pl.col("missing") != ""))
        .select(IDENTITY)
    )
    isolated = plan.isolated.filter(pl.col("reason") == "missing_required_attribute")
    return CheckOutcome(
        name="required_attributes",
        passed=lacking.height == 0 and isolated.height == 0,
        blocking=False,
        description=(
            "every entity has " + ", ".join(REQUIRED_ATTRIBUTES)
            if lacking.height == 0 and isolated.height == 0
            else f"{isolated.height} entities isolated for missing required attributes"
        ),
        metadata={
            "isolated": isolated.height,
            "planned_without_required": lacking.height,
            "examples": _examples(isolated),
        },
    )


def evaluate_checks(
    plan: Plan,
    operations: pl.DataFrame | pl.LazyFrame,
    snapshot: pl.DataFrame | SnapshotView,
    threshold: float,
    approval: Approval | None,
) -> list[CheckOutcome]:
    """Every check of a plan; ``operations``: its operations with their JSON (the plan's file,
    scanned), which the scope check reads."""
    return [
        *blocking_checks(plan.header, operations, threshold, approval),
        check_references(plan, snapshot),
        check_required_attributes(plan),
    ]


def blocking_checks(
    header: PlanHeader,
    operations: pl.DataFrame | pl.LazyFrame,
    threshold: float,
    approval: Approval | None,
) -> list[CheckOutcome]:
    """The checks that hold a plan: what the publish step runs again on the plan it applies."""
    return [
        check_scope(header.source, operations),
        check_deletion_safety(header, threshold, approval),
    ]


def blocking_failures(checks: Iterable[CheckOutcome]) -> list[CheckOutcome]:
    return [c for c in checks if c.blocking and not c.passed]
