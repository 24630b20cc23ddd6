"""Compare a batch with its source's current snapshot.

First the batch is screened: entities that cannot be published (another source's, unknown type,
one identity with two contents) are isolated and reported, never silently dropped. Then the rest
is joined with the snapshot on identity and compared by content hash: volatile attributes are not
in the hash, so a batch that only changed them is all "unchanged".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from publish_platform.entities import (
    TYPE_RANK,
    EntityIssue,
    HashIndex,
    ParsedEntities,
    spilled_values,
    type_rank,
    with_entities,
)
from publish_platform.scratch import ScratchFolder
from publish_platform.state import (
    SNAPSHOT_SCHEMA,
    StateStore,
    empty_snapshot,
    identity_hash,
    scan_snapshot,
)

Mode = Literal["full", "incremental"]


def plan_order() -> pl.Expr:
    """Where a change goes in a plan: creates and updates parents first, then deletes children
    first. A stable sort by it keeps the diff's order (the batch's lines) within a type rank."""
    rank = type_rank()  # a byte, as is every place (at most 23)
    deleted = pl.lit(2 * len(TYPE_RANK) + 1, pl.UInt8) - rank
    return pl.when(pl.col("op") == "delete").then(deleted).otherwise(rank)


# What a stored diff holds per entity: the snapshot's columns, the operation, and the required
# attributes the entity lacks ("" when none; null for a delete, or when not known).
DIFF_SCHEMA = {"op": pl.String, **SNAPSHOT_SCHEMA, "missing": pl.String}
# In memory, the JSON, references and hashes (FILLED) of a row with an ``entity_row`` may be not
# in the frame but in the diff's ``entities`` (``entities.with_entities`` puts them back).
CHANGES_SCHEMA = {**DIFF_SCHEMA, "entity_row": pl.UInt32}

IDENTITY = ["type_name", "qualified_name"]
# What is read of a snapshot's rows: all but the entity JSON, which a plan never needs.
ROW_COLUMNS = [name for name in SNAPSHOT_SCHEMA if name != "entity"]
# Lines compared with their snapshot rows at once: a diff holds the hashes and guids of a slice
# of those it finds, not of all (when a batch changes most of a 5M source, millions).
DIFF_SLICE_ROWS = 500_000
IDENTITY_SCHEMA = {name: pl.String for name in IDENTITY}


@dataclass
class DiffResult:
    source: str
    mode: Mode
    # CHANGES_SCHEMA: create / update / delete rows; held, or scanned from a stored diff
    changes: pl.DataFrame | pl.LazyFrame
    lines: int
    valid_entities: int
    snapshot_entities: int
    issues: list[EntityIssue] = field(default_factory=list)
    deletions_withheld: str | None = None
    unchanged: int = 0  # entities of the batch equal to their snapshot row (not listed)
    # The snapshot compared against: where the plan finds the unchanged entities.
    snapshot: SnapshotView | None = field(default=None, repr=False)
    # Where the JSON, references and hashes of the changes with an ``entity_row`` are (the
    # parse's spill, a stored diff).
    entities: pl.LazyFrame | None = field(default=None, repr=False)

    def stored_changes(self, scratch: Path) -> pl.LazyFrame:
        """The changes with their JSON, references and hashes (DIFF_SCHEMA), as stored: filled a
        chunk at a time into files in ``scratch`` (``entities.with_entities``), and scanned."""
        return with_entities(self.changes, self.entities, scratch).select(list(DIFF_SCHEMA))

    def count(self, op: str) -> int:
        if op == "unchanged":
            return self.unchanged
        # Counted by an expression: a filter copies the rows, and a column taken out of the
        # frame spells out a first batch's one "create" row by row.
        counted = self.changes.lazy().select((pl.col("op") == op).sum())
        return int(counted.collect(engine="streaming").item())

    @property
    def isolated(self) -> int:
        return len(self.issues)

    def issue_counts(self) -> dict[str, int]:
        return dict(Counter(issue.reason for issue in self.issues))


def identity_hashes(identities: pl.DataFrame) -> pl.Series:
    """The identity hash (``state.identity_hash``) of each row, to look up in a SnapshotView."""
    return identities.select(identity_hash()).to_series()


class SnapshotView:
    """What a diff and its plan read of a source's snapshot.

    Held in memory: the row count, and the hash of every row's identity in an index (about 26
    bytes a row, built when first asked for): enough to find the row of an identity and tell
    whether an identity exists. Whole rows are read only for the few a batch touches, from the
    snapshot file when it is one: memory does not grow with the snapshot's payload or
    references. The raw hashes that recognise unchanged lines are indexed for the parse only
    (``raw_index``), and not kept.
    """

    def __init__(self, snapshot: pl.DataFrame | Path, keep: object = None) -> None:
        """``snapshot``: SNAPSHOT_SCHEMA, in memory or a file; ``keep``: what must live as long
        as the view (the file's temporary folder)."""
        self._keep = keep
        self.path = snapshot if isinstance(snapshot, Path) else None  # None: held in memory
        if isinstance(snapshot, Path):
            self._snapshot = scan_snapshot(snapshot, row_index="snapshot_row")
            self.entities = pl.scan_parquet(snapshot).select(pl.len()).collect().item()
        else:
            self._snapshot = (
                snapshot.lazy()
                .with_row_index("snapshot_row")
                .with_columns(identity_hash=identity_hash())
            )
            self.entities = snapshot.height
        self._loaded = self._snapshot.clear().select("snapshot_row", *ROW_COLUMNS).collect()

    @cached_property
    def identities(self) -> HashIndex:
        """The identity hash of every row. Built when first asked for: in the diff step, after
        the parse and its raw-hash index are done with."""
        identity = pl.col("identity_hash")
        ids = self._snapshot.select(
            high=identity.floordiv(2**64).cast(pl.UInt64), low=(identity % 2**64).cast(pl.UInt64)
        ).collect(engine="streaming")
        return HashIndex(ids.get_column("high").to_numpy(), ids.get_column("low").to_numpy())

    def raw_index(self) -> HashIndex:
        """The raw hashes of the rows that have one, each with its row: what recognises a
        batch's unchanged lines. Built anew at each call and not kept: only the parse needs it
        (about 22 bytes a row), and the diff and the plan follow it."""
        raw = pl.col("raw_hash")
        known = (
            self._snapshot.filter(raw.is_not_null())  # rows of older snapshots may have none
            .select(
                "snapshot_row",
                high=raw.floordiv(2**64).cast(pl.UInt64),
                low=(raw % 2**64).cast(pl.UInt64),
            )
            .collect(engine="streaming")
        )
        return HashIndex(
            known.get_column("high").to_numpy(),
            known.get_column("low").to_numpy(),
            known.get_column("snapshot_row").to_numpy(),
        )

    @cached_property
    def _identity_at(self) -> np.ndarray:
        """Where each row's identity hash is in the identity index: rows are read by their
        identity hashes, a column the reader filters on before decoding the others."""
        at = np.empty(self.entities, dtype=np.int32)
        at[self.identities.rows] = np.arange(len(self.identities), dtype=np.int32)
        return at

    def rows(self, numbers: np.ndarray) -> pl.DataFrame:
        """The rows with these numbers (``snapshot_row`` and ROW_COLUMNS), in row order, read
        and kept: the few rows a batch touches, which its diff and plan then ``read`` from
        memory. Many rows are ``read`` a slice at a time instead."""
        wanted = pl.Series("snapshot_row", np.unique(numbers), dtype=pl.UInt32)
        missing = wanted.filter(~wanted.is_in(self._loaded.get_column("snapshot_row").implode()))
        if missing.len():
            read = self.read(missing.to_numpy(), ROW_COLUMNS)
            # The reader keeps row order: a first read needs no sort (nor a copy).
            if self._loaded.height:
                read = pl.concat([self._loaded, read], how="vertical").sort("snapshot_row")
            self._loaded = read
        if self._loaded.height == wanted.len():  # all rows read are wanted: no copy
            return self._loaded
        return self._loaded.join(wanted.to_frame(), on="snapshot_row", how="semi")

    def read(self, numbers: np.ndarray, columns: list[str]) -> pl.DataFrame:
        """The rows with these numbers, ``snapshot_row`` and their ``columns``, in row order:
        from the rows kept if they are all there, else read and not kept. Filtered on their
        identity hashes first, a column the reader filters on before decoding the others."""
        wanted = pl.Series("snapshot_row", np.unique(numbers), dtype=pl.UInt32)
        selected = ["snapshot_row", *columns]
        if not wanted.len():
            return self._snapshot.clear().select(selected).collect()
        kept = self._loaded.get_column("snapshot_row")
        if kept.len() and wanted.is_in(kept.implode()).all():  # kept: not read again
            if wanted.len() == kept.len():
                return self._loaded.select(selected)  # (no copy)
            # (The columns selected first: only they are copied.)
            return self._loaded.select(selected).join(
                wanted.to_frame(), on="snapshot_row", how="semi"
            )
        at = self._identity_at[wanted.to_numpy()]
        hashes = pl.DataFrame(
            {"high": self.identities.high[at], "low": self.identities.low[at]}
        ).select(pl.col("high").cast(pl.UInt128) * 2**64 + pl.col("low").cast(pl.UInt128))
        return (
            self._snapshot.filter(pl.col("identity_hash").is_in(hashes.to_series().implode()))
            .select(selected)
            .filter(pl.col("snapshot_row").is_in(wanted.implode()))
            .collect(engine="streaming")
        )

    def find(self, identities: pl.DataFrame) -> np.ndarray:
        """The snapshot row of each identity's hash, -1 where there is none. An empty snapshot
        hashes nothing: a source's first batch, every line of which is looked up."""
        if not self.entities:
            return np.full(identities.height, -1, dtype=np.int64)
        return self.identities.find(identity_hashes(identities))

    def rows_of(self, identities: pl.DataFrame) -> pl.DataFrame:
        """The rows of these identities (those the snapshot has), as ``read``."""
        found = self.find(identities)
        rows = self.read(found[found >= 0], ROW_COLUMNS)
        at = paired_rows(identities, found, rows)
        return rows[np.unique(at[at >= 0])]

    def exists(self, identities: pl.DataFrame) -> pl.DataFrame:
        """Those of ``identities`` the snapshot has, by their 128-bit hash (no row is read)."""
        return identities.filter(pl.Series(self.find(identities) >= 0))


# Identities compared with their rows' at once (by ``paired_rows``): a slice of them copied.
PAIRED_SLICE = 1_000_000


def paired_rows(identities: pl.DataFrame, found: np.ndarray, rows: pl.DataFrame) -> np.ndarray:
    """Where in ``rows`` (``SnapshotView.read``: in row order) the row each of ``identities``
    was ``found`` at by its hash is, when that row has that very identity; -1 where none.

    By position, not by a join on the identity strings (200 MB at 200k rows) or on row numbers:
    the identities are compared with their rows' a slice at a time."""
    numbers = rows.get_column("snapshot_row").to_numpy()
    at = np.searchsorted(numbers, found).clip(max=max(len(numbers) - 1, 0))
    hit = (found >= 0) & (len(numbers) > 0)
    hit[hit] = numbers[at[hit]] == found[hit]
    claimed = np.flatnonzero(hit)
    theirs = rows.select(IDENTITY)
    for start in range(0, len(claimed), PAIRED_SLICE):
        part = claimed[start : start + PAIRED_SLICE]
        same = (identities[part] == theirs[at[part]]).select(pl.all_horizontal(IDENTITY))
        hit[part[~same.to_series().to_numpy()]] = False
    return np.where(hit, at, -1)


def open_snapshot(state: StateStore, source: str, serial: int) -> SnapshotView:
    """A committed snapshot of ``source``, downloaded to a temporary file that is removed with
    the view."""
    if serial == 0:
        return SnapshotView(empty_snapshot())
    scratch = ScratchFolder("snapshot")
    path = state.download_snapshot(source, serial, scratch.path)
    assert path is not None
    return SnapshotView(path, keep=scratch)


def as_view(snapshot: pl.DataFrame | SnapshotView) -> SnapshotView:
    return snapshot if isinstance(snapshot, SnapshotView) else SnapshotView(snapshot)


def recognisable(snapshot: pl.DataFrame | SnapshotView) -> HashIndex:
    """The snapshot's raw hashes, each with its row: batch lines with one of these are unchanged
    (not parsed), and take identity, hash and guid from that row. Hold it for the parse only."""
    return as_view(snapshot).raw_index()


def derive_source(parsed: ParsedEntities) -> str | list[str]:
    """The batch's connection, from its data: exactly one, or the list of all it names."""
    connections = (
        parsed.scan()
        .select(pl.col("connection_qualified_name").unique().cast(pl.String).sort())
        .collect(engine="streaming")
        .to_series()
        .to_list()
    )
    return connections[0] if len(connections) == 1 else connections


def diff_batch(
    parsed: ParsedEntities,
    snapshot: pl.DataFrame | SnapshotView,
    source: str,
    mode: Mode,
    force: bool = False,
) -> DiffResult:
    """Screen the batch, then compute creates, updates and (full mode) deletes against snapshot.

    ``force`` re-sends every entity of the batch as an update even if unchanged (a republish
    that repairs a drifted metastore); deletions are computed as usual.

    Most of a batch is lines recognised as unchanged (``parsed.unchanged``): they point at their
    snapshot rows. Of the rows the parsed lines name, only what pairs and compares them is read
    (identity, hash and guid), a slice of DIFF_SLICE_ROWS lines at a time; whole rows only for
    the entities deleted, isolated, or named by a recognised line and a parsed one. All else is
    decided on the row numbers.
    """
    if force and parsed.unchanged.height:
        raise ValueError("a forced diff re-sends every entity: parse every line (no known_raw)")
    view = as_view(snapshot)
    if parsed.spilled and not view.entities:
        return _first_diff(parsed, view, source, mode)
    recognised_rows = parsed.unchanged.get_column("snapshot_row")
    recognised = np.zeros(view.entities, dtype=bool)
    recognised[recognised_rows.to_numpy()] = True

    # Each parsed line is paired with its snapshot row by number (-1: none; a join on the
    # identity strings copied the changes twice over) and compared with it by hash, a slice of
    # lines at a time: of the rows, only the guids of those changed are held.
    lines = parsed.frame.select(*IDENTITY, "hash", "entity_row")
    unrecognised = np.flatnonzero(~recognised)
    found_all = None  # each slice's lines are looked up on their own, unless all were at once
    if lines.height + len(unrecognised) <= DIFF_SLICE_ROWS:
        # Few rows to touch (one slice): read whole at once, and kept for the plan
        # (``SnapshotView.read``).
        found_all = view.find(lines)
        view.rows(np.union1d(found_all[found_all >= 0], unrecognised))
    named_rows = np.full(lines.height, -1, dtype=np.int64)
    changed = np.zeros(lines.height, dtype=bool)
    guids = [pl.Series("guid", [], dtype=pl.String)]
    for start in range(0, lines.height, DIFF_SLICE_ROWS):
        part = lines.slice(start, DIFF_SLICE_ROWS)
        found = view.find(part) if found_all is None else found_all
        rows = view.read(found[found >= 0], [*IDENTITY, "hash", "guid"])
        at = paired_rows(part.select(IDENTITY), found, rows)
        paired = at >= 0
        named_rows[start : start + part.height][paired] = rows.get_column(
            "snapshot_row"
        ).to_numpy()[at[paired]]
        changes_here = paired.copy()
        if not force:
            # The lines' hashes, to compare with their rows' (a spilled parse's are read from
            # its spill).
            hashes = spilled_values(part.filter(pl.Series(paired)), parsed.entities, ["hash"])
            differs = hashes.get_column("hash") != rows.get_column("hash").gather(at[paired])
            changes_here[paired] = differs.fill_null(False).to_numpy()
        changed[start : start + DIFF_SLICE_ROWS] = changes_here
        unchanged_at = pl.Series(at).set(pl.Series(~changes_here), None)
        guids.append(rows.get_column("guid").gather(unchanged_at))
    guid = pl.concat(guids)
    del lines, guids

    # Recognised lines stay row numbers. Those whose entity also appears on a parsed line are
    # screened with it: a duplicate, or a conflict that isolates both.
    # (A mask over the snapshot's rows: a join would hash every recognised line.)
    in_parsed = np.zeros(view.entities, dtype=bool)
    in_parsed[named_rows[named_rows >= 0]] = True
    overlap = parsed.unchanged.filter(pl.Series(in_parsed[recognised_rows.to_numpy()])).unique(
        "snapshot_row", keep="first", maintain_order=True
    )
    overlap = overlap.join(
        view.read(
            overlap.get_column("snapshot_row").to_numpy(),
            [*IDENTITY, "hash", "references", "raw_hash"],
        ),
        on="snapshot_row",
    )
    candidates = parsed.frame
    # Each candidate's snapshot row (-1: none), whether it changed, and its row's guid if so. A
    # line of the overlap is its row: unchanged.
    candidate_rows, candidate_changed, candidate_guid = named_rows, changed, guid
    if overlap.height:
        candidates = pl.concat(
            [
                parsed.frame,
                overlap.select(
                    *IDENTITY,
                    connection_qualified_name=pl.lit(source, pl.Categorical),
                    hash="hash",
                    entity=pl.lit(None, pl.String),
                    references="references",
                    source_file="source_file",
                    line=pl.col("line").cast(pl.Int64),
                    raw_hash="raw_hash",
                    missing=pl.lit(None, pl.String),
                    entity_row=pl.lit(None, pl.UInt32),
                ),
            ],
            how="vertical",
            rechunk=True,  # a join or gather copies the entity JSON of a frame of many chunks
        )
        candidate_rows = np.concatenate(
            [named_rows, overlap.get_column("snapshot_row").to_numpy().astype(np.int64)]
        )
        candidate_changed = np.concatenate([changed, np.zeros(overlap.height, dtype=bool)])
        candidate_guid = pl.concat([guid, pl.Series([None] * overlap.height, dtype=pl.String)])
    candidates = candidates.with_row_index("batch_row")  # the order of the lines
    batch, issues = screen(candidates, source, parsed.issues, parsed.entities)
    protected = _protected_identities(issues)

    at = batch.get_column("batch_row").to_numpy()
    batch_rows = candidate_rows[at]
    updated = candidate_changed[at]
    listed = (batch_rows < 0) | updated  # creates, and the updates
    present = recognised.copy()  # the snapshot's rows the batch has (a mask over them)
    present[batch_rows[batch_rows >= 0]] = True
    upserts = batch.filter(pl.Series(listed)).with_columns(
        op=pl.when(pl.Series(updated[listed])).then(pl.lit("update")).otherwise(pl.lit("create")),
        guid=candidate_guid.gather(at[listed]),
    )
    # Unchanged entities are counted, not listed: the next snapshot keeps them from the base.
    unchanged = int((batch_rows >= 0).sum() - updated.sum())
    unchanged += recognised_rows.n_unique() - overlap.height
    del batch, candidates, candidate_guid

    deletions_withheld = _deletions_withheld(mode, issues)
    deletes = pl.DataFrame(schema=CHANGES_SCHEMA)
    if mode == "full" and deletions_withheld is None:
        # The rows the batch does not have are deleted, unless their entity was isolated.
        isolated_rows = view.rows_of(
            pl.DataFrame(sorted(protected), schema=IDENTITY_SCHEMA, orient="row")
        )
        present[isolated_rows.get_column("snapshot_row").to_numpy()] = True
        deletes = (
            view.read(np.flatnonzero(~present), ROW_COLUMNS)
            .with_columns(
                op=pl.lit("delete"),
                entity=pl.lit(None, pl.String),
                missing=pl.lit(None, pl.String),
                entity_row=pl.lit(None, pl.UInt32),
            )
            .select(list(CHANGES_SCHEMA))
        )

    # In plan order, and within a type rank in the order of the lines (whatever the parse held
    # or spilled): the plan step has nothing to sort (its copy was the larger part of a first
    # plan's memory), and each rank reads the spilled JSON back in one pass. The parse lists
    # its lines in that order: only lines of the overlap, listed last, can be out of it.
    in_order = upserts.select(plan_order().is_sorted() & pl.col("batch_row").is_sorted())
    if not in_order.item():
        upserts = upserts.sort(plan_order(), "batch_row")
    changes = upserts.select(list(CHANGES_SCHEMA))
    if deletes.height:
        changes = pl.concat(
            [changes, deletes.sort(plan_order(), maintain_order=True)],
            how="vertical",
            rechunk=False,  # (a copy of every change; a plan reads them in a stream)
        )
    return DiffResult(
        source=source,
        mode=mode,
        changes=changes,
        lines=parsed.lines,
        valid_entities=parsed.frame.height + parsed.unchanged.height,
        snapshot_entities=view.entities,
        issues=issues,
        deletions_withheld=deletions_withheld,
        unchanged=unchanged,
        snapshot=view,
        entities=parsed.entities,
    )


def _first_diff(
    parsed: ParsedEntities, snapshot: SnapshotView, source: str, mode: Mode
) -> DiffResult:
    """A source's first batch, spilled (``parsed.spilled``): every entity it can publish is a
    create, listed as the parse spilled them (in plan order), scanned from its files and never
    held. (Held, a 5M first batch's rows took 1.1 GB of its diff step.)

    Only the rows that may be isolated are read, and screened as a whole batch would be: those
    that fail a test of their own (``row_tests``: source, namespace, type), and those whose
    identity's 64-bit hash another row shares (8 bytes a row are held to find them). Rows
    outside these pass every test, and their identities are each named once.
    """
    rows = parsed.scan()
    suspect = pl.any_horizontal(failed for failed, _, _ in row_tests(source))
    hashes = rows.select(identity_hash_64()).collect(engine="streaming").to_series()
    suspects = rows.filter(suspect | identity_hash_64().is_in(repeated_values(hashes).implode()))
    suspects = suspects.collect(engine="streaming")
    kept, issues = screen(suspects, source, parsed.issues, parsed.entities)
    dropped = suspects.join(kept, on="entity_row", how="anti").get_column("entity_row")
    changes = rows.filter(~pl.col("entity_row").is_in(dropped.implode())) if dropped.len() else rows
    return DiffResult(
        source=source,
        mode=mode,
        changes=changes.with_columns(op=pl.lit("create"), guid=pl.lit(None, pl.String)).select(
            list(CHANGES_SCHEMA)
        ),
        lines=parsed.lines,
        valid_entities=hashes.len(),
        snapshot_entities=0,
        issues=issues,
        deletions_withheld=_deletions_withheld(mode, issues),
        snapshot=snapshot,
        entities=parsed.entities,
    )


def _deletions_withheld(mode: Mode, issues: list[EntityIssue]) -> str | None:
    """Why a full batch infers no deletion: lines it could not identify (None: it does)."""
    unidentified = [i for i in issues if i.qualified_name is None or i.type_name is None]
    if mode != "full" or not unidentified:
        return None
    return (
        f"{len(unidentified)} line(s) without an identity: an absent entity may be one of them,"
        " so no deletion is inferred from this batch"
    )


def read_changes(path: Path) -> pl.LazyFrame:
    """A stored diff's changes (CHANGES_SCHEMA), scanned: each use reads them from the file in a
    stream, and none holds them. Held, a 5M first batch's took 748 MB of its plan step even
    without their JSON, references and hashes (a 16-byte view for each of their strings)."""
    return as_changes(pl.scan_parquet(path))


def as_changes(changes: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame | pl.LazyFrame:
    """Changes in CHANGES_SCHEMA: a frame of DIFF_SCHEMA without the parse's columns (from an
    older stored diff, or built by hand) gets them as not known."""
    present = changes.collect_schema().names()
    absent = [pl.lit(None, t).alias(n) for n, t in CHANGES_SCHEMA.items() if n not in present]
    return changes.with_columns(absent).select(list(CHANGES_SCHEMA)) if absent else changes


def screen(
    frame: pl.DataFrame,
    source: str,
    issues: list[EntityIssue] | None = None,
    entities: pl.LazyFrame | None = None,
) -> tuple[pl.DataFrame, list[EntityIssue]]:
    """Isolate what cannot be published: wrong source, unknown type, conflicting duplicates.
    ``entities``: the parse's spill, where the hashes of the rows with an ``entity_row`` are."""
    issues = list(issues or [])

    def isolate(mask: pl.Expr, reason: str, message: str) -> None:
        nonlocal frame
        bad = frame.filter(mask)
        if not bad.height:  # the usual case: no copy of the batch without them
            return
        for row in bad.select("source_file", "line", *IDENTITY, "connection_qualified_name").rows(
            named=True
        ):
            issues.append(
                EntityIssue(
                    row["source_file"],
                    row["line"],
                    reason,
                    message.format(**row),
                    row["type_name"],
                    row["qualified_name"],
                )
            )
        frame = frame.filter(~mask)

    for failed, reason, message in row_tests(source):
        isolate(failed, reason, message)
    # Most batches name each identity once: then no identity is grouped, only their 64-bit
    # hashes are sorted (a window over a first batch's million identities took 250 MB, a hash
    # table of its hashes 100 MB, a struct of its identities 70 MB). A hash shared by two
    # identities only makes their rows candidates.
    hashes = frame.select(identity_hash_64()).to_series()
    shared = repeated_values(hashes)
    if shared.len():
        repeated = hashes.is_in(shared.implode())
        named_twice = spilled_values(
            frame.select(*IDENTITY, "hash", "entity_row").with_row_index("at").filter(repeated),
            entities,
            ["hash"],
        )
        conflicting = named_twice.filter(pl.col("hash").n_unique().over(IDENTITY) > 1)
        isolate(
            pl.int_range(pl.len()).is_in(conflicting.get_column("at").implode()),
            "conflicting_duplicate",
            "identity appears more than once with different content; none of them is published",
        )
        # Exact duplicates (same identity, same content) are harmless: keep the first.
        frame = frame.filter(pl.struct(IDENTITY).is_first_distinct())
    return frame, issues


def row_tests(source: str) -> list[tuple[pl.Expr, str, str]]:
    """What ``screen`` tests each row for on its own: where it fails, the reason, and the
    message (formatted with the row's values)."""
    name = pl.col("qualified_name")
    return [
        (
            pl.col("connection_qualified_name") != source,
            "wrong_source",
            f"belongs to connection {{connection_qualified_name}}, not to this batch's {source}",
        ),
        (
            (name != source) & ~name.str.starts_with(source + "/"),
            "wrong_source",
            f"qualifiedName {{qualified_name}} lies outside the namespace of connection {source}",
        ),
        (
            ~pl.col("type_name").is_in(list(TYPE_RANK)),
            "unknown_type",
            "typeName {type_name} is not a type this platform publishes",
        ),
    ]


def identity_hash_64() -> pl.Expr:
    """A 64-bit hash of each row's identity: what finds the identities a batch names twice."""
    return pl.col("qualified_name").hash(1).xor(pl.col("type_name").hash(2))


def repeated_values(hashes: pl.Series) -> pl.Series:
    """The values ``hashes`` holds more than once (each once), found by a sort: no hash table."""
    ordered = hashes.sort()
    return ordered.filter(ordered == ordered.shift(1)).unique()


def _protected_identities(issues: list[EntityIssue]) -> set[tuple[str, str]]:
    """Identities present in the batch but isolated: their absence is not a deletion."""
    return {
        (issue.type_name, issue.qualified_name)
        for issue in issues
        if issue.type_name and issue.qualified_name and issue.reason != "wrong_source"
    }
