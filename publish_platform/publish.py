"""Execute a plan against a metastore, chunk by chunk, and derive the next snapshot.

A chunk that fails is split in halves until the failing entities are isolated: the rest of the
batch is published, and each failed entity is recorded with its reason. Failed entities keep their
old snapshot row (or none), so the next batch of the source sees them as changed and retries them.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import polars as pl

from publish_platform.metastores.base import (
    EntityWrites,
    Identity,
    Metastore,
    MetastoreRefusedError,
    TransientMetastoreError,
    WriteColumns,
    WriteResult,
    WriteResults,
)
from publish_platform.retries import RetryTiers, with_immediate_retries
from publish_platform.state import SNAPSHOT_SCHEMA

RESULT_SCHEMA = {
    "seq": pl.Int64,
    "ok": pl.Boolean,
    "guid": pl.String,
    "error": pl.String,
}

Progress = Callable[[int, int], None]
RetryObserver = Callable[[int, Exception], None]


@dataclass
class PublishOutcome:
    # RESULT_SCHEMA, one row per operation: held, or scanned from the files a publish given a
    # folder wrote them to (``execute_plan``)
    results: pl.DataFrame | pl.LazyFrame
    requests: int = 0
    split_chunks: int = 0
    resumed: int = 0  # operations already applied by an earlier, interrupted attempt
    immediate_retries: int = 0  # tier 1: chunks retried in-step after a transient error
    duration_s: float = 0.0
    errors: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> int:
        total, succeeded = self._counts()
        return total - succeeded

    @property
    def succeeded(self) -> int:
        return self._counts()[1]

    def _counts(self) -> tuple[int, int]:
        """Results, and those that succeeded: counted, not filtered (a filter copies the rows),
        and in a stream if they are files."""
        counted = self.results.lazy().select(pl.len(), pl.col("ok").sum())
        total, ok = counted.collect(engine="streaming").row(0)
        return int(total), int(ok or 0)


class Checkpoint(Protocol):
    """Durable per-chunk results, so a publish that died resumes where it stopped."""

    def done(self) -> pl.DataFrame: ...

    def record(self, results: pl.DataFrame) -> None: ...


# Operations read from a stored plan at a time (rounded to whole chunks): what bounds the
# memory of a publish, whatever the plan's size. A plan of 5M creates read whole took 9 GB.
PLAN_PART_ROWS = 50_000


def execute_plan(
    operations: pl.DataFrame | pl.LazyFrame,
    metastore: Metastore,
    chunk_size: int,
    purge: bool = False,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
    tiers: RetryTiers | None = None,
    on_retry: RetryObserver | None = None,
    source: str | None = None,
    spill: Path | None = None,
) -> PublishOutcome:
    """Apply every operation not already recorded in ``checkpoint``; return all results.

    ``operations``: the plan, in memory or scanned from its file (then read a part at a time).
    ``source``: the batch's connection, which every entity of its plan belongs to (screened by
    the diff); it saves the metastore reading it out of each entity. ``spill``: a folder the
    results are written to, a part of the plan's at a time, and scanned from: held, they took
    about 60 bytes an operation (its guid, 36 characters, the most), 300 MB at 5M.
    """
    started = time.perf_counter()
    previous = checkpoint.done() if checkpoint is not None else pl.DataFrame(schema=RESULT_SCHEMA)
    outcome = PublishOutcome(results=previous, resumed=previous.height)
    recorded = previous.get_column("seq").implode()
    parts = [previous]
    written: list[Path] = []

    def let_wait() -> None:
        """The results so far to a file of the spill: held no longer."""
        if spill is None or not any(part.height for part in parts):
            return
        spill.mkdir(parents=True, exist_ok=True)
        written.append(spill / f"{len(written):08d}.parquet")
        pl.concat(parts, how="vertical").write_parquet(written[-1], compression="lz4")
        parts.clear()

    done = previous.height
    total = _height(operations)
    tiers = tiers or RetryTiers()
    for plan_part in _plan_parts(operations, total, chunk_size):
        # In plan order (parents first). A filter, not an anti-join: that one copied every
        # entity of the part even with nothing recorded.
        remaining = plan_part.filter(~pl.col("seq").is_in(recorded))
        references = _References.of(remaining)
        for start, chunk in _chunks(remaining, chunk_size):
            applied: list[pl.DataFrame] = []
            for operations_done, results in _apply_isolating(
                chunk, start, references, metastore, purge, outcome, tiers, on_retry, source
            ):
                applied.append(_results_frame(operations_done, results))
                outcome.errors += _errors(results)
            part = applied[0] if len(applied) == 1 else pl.concat(applied, how="vertical")
            if checkpoint is not None:
                checkpoint.record(part)
            parts.append(part)
            done += chunk.height
            if progress is not None:
                progress(done, total)
        let_wait()
    results = pl.scan_parquet(written) if written else pl.concat(parts, how="vertical")
    outcome.results, _ = _in_plan_order(results)
    outcome.duration_s = time.perf_counter() - started
    return outcome


def _errors(results: Sequence[WriteResult]) -> list[dict]:
    if isinstance(results, WriteResults):  # those all succeeded
        return []
    return [
        {"type_name": r.type_name, "qualified_name": r.qualified_name, "error": r.error}
        for r in results
        if not r.ok
    ]


def _in_plan_order(
    results: pl.DataFrame | pl.LazyFrame,
) -> tuple[pl.DataFrame | pl.LazyFrame, pl.Series]:
    """Results by seq, and their seqs; as they usually are already, then not copied (a copy is
    60 bytes a row: 300 MB at 5M operations). (Out of order, after a resumed publish, they are
    sorted.)"""
    seq = results.lazy().select("seq").collect(engine="streaming").to_series()
    if seq.is_sorted():
        return results, seq
    return results.sort("seq", maintain_order=True), seq.sort()


def _height(operations: pl.DataFrame | pl.LazyFrame) -> int:
    if isinstance(operations, pl.DataFrame):
        return operations.height
    return int(operations.select(pl.len()).collect().item())  # a file's: from its metadata


def _plan_parts(
    operations: pl.DataFrame | pl.LazyFrame, total: int, chunk_size: int
) -> Iterator[pl.DataFrame]:
    """The plan in consecutive parts of whole chunks: slices of a frame, or reads of a file
    that decode only the row groups of the part."""
    rows = max(chunk_size, PLAN_PART_ROWS // chunk_size * chunk_size)
    for offset in range(0, total, rows):
        if isinstance(operations, pl.DataFrame):
            yield operations.slice(offset, rows)
        else:
            yield operations.slice(offset, rows).collect()


def _results_frame(operations: pl.DataFrame, results: Sequence[WriteResult]) -> pl.DataFrame:
    """RESULT_SCHEMA rows of ``operations``, built column by column (not a tuple per row)."""
    if isinstance(results, WriteResults):
        ok: list[bool] = [True] * len(results)
        guids: list[str | None] = list(results.guids)
        errors: list[str | None] = [None] * len(results)
    else:
        ok = [r.ok for r in results]
        guids = [r.guid for r in results]
        errors = [r.error for r in results]
    return pl.DataFrame(
        {"seq": operations.get_column("seq"), "ok": ok, "guid": guids, "error": errors},
        schema=RESULT_SCHEMA,
    )


def _chunks(operations: pl.DataFrame, chunk_size: int) -> Iterator[tuple[int, pl.DataFrame]]:
    """Consecutive operations of one kind (upsert or delete), at most chunk_size each, with the
    position of the first: slices of the plan, so no row is copied into Python before its chunk
    is sent."""
    is_delete = operations.get_column("op").eq("delete").to_list()
    start, total = 0, len(is_delete)
    while start < total:
        end = start + 1
        while end < total and end - start < chunk_size and is_delete[end] == is_delete[start]:
            end += 1
        yield start, operations.slice(start, end - start)
        start = end


@dataclass(frozen=True)
class _References:
    """The plan's references, flattened once; a chunk's are a slice of them. (Flattening each
    chunk's was a polars query per chunk, which could wait on polars' thread pool longer than
    SQLite took to write the chunk.)"""

    rows: list[int]  # the position in the plan of each reference's entity, ascending
    flat: pl.DataFrame  # row, attribute, type_name, qualified_name

    @classmethod
    def of(cls, operations: pl.DataFrame) -> _References:
        flat = (
            operations.select(pl.int_range(pl.len()).alias("row"), "references")
            .explode("references")
            .drop_nulls("references")
            .unnest("references")
        )
        return cls(flat.get_column("row").to_list(), flat)

    def of_rows(self, start: int, stop: int) -> tuple[list[int], list[str], list[str], list[str]]:
        """The references of operations ``start`` to ``stop``: the position of their entity
        among these, then attribute, type and qualifiedName of their target."""
        first, last = bisect_left(self.rows, start), bisect_left(self.rows, stop)
        part = self.flat.slice(first, last - first)
        return (
            [row - start for row in self.rows[first:last]],
            part.get_column("attribute").to_list(),
            part.get_column("type_name").to_list(),
            part.get_column("qualified_name").to_list(),
        )


def _apply_isolating(
    chunk: pl.DataFrame,
    start: int,
    references: _References,
    metastore: Metastore,
    purge: bool,
    outcome: PublishOutcome,
    tiers: RetryTiers,
    on_retry: RetryObserver | None,
    source: str | None,
) -> Iterator[tuple[pl.DataFrame, Sequence[WriteResult]]]:
    """(operations, their results) of ``chunk`` (operations ``start`` … of the plan): the whole
    chunk, or the parts it splits into when it fails, down to the single failed operations."""

    def retried(attempt: int, exc: Exception) -> None:
        outcome.requests += 1
        outcome.immediate_retries += 1
        if on_retry is not None:
            on_retry(attempt, exc)

    outcome.requests += 1
    try:
        results = with_immediate_retries(
            lambda: _apply(chunk, start, references, metastore, purge, source), tiers, retried
        )
    except (TransientMetastoreError, MetastoreRefusedError):
        raise  # the metastore, not this chunk, is failing: splitting would not help (tier 2)
    except Exception as exc:  # noqa: BLE001 - any failure of a chunk is isolated, then reported
        if chunk.height == 1:
            row = chunk.row(0, named=True)
            message = f"{type(exc).__name__}: {exc}"[:2000]
            yield (
                chunk,
                [WriteResult(row["type_name"], row["qualified_name"], False, None, message)],
            )
            return
        outcome.split_chunks += 1
        middle = chunk.height // 2
        for half, at in ((chunk.head(middle), start), (chunk.slice(middle), start + middle)):
            yield from _apply_isolating(
                half, at, references, metastore, purge, outcome, tiers, on_retry, source
            )
        return
    if len(results) != chunk.height:
        raise ValueError(f"{len(results)} results for {chunk.height} operations")
    yield chunk, results


def _apply(
    chunk: pl.DataFrame,
    start: int,
    references: _References,
    metastore: Metastore,
    purge: bool,
    source: str | None,
) -> Sequence[WriteResult]:
    if chunk.item(0, "op") == "delete":
        return metastore.delete(
            [
                Identity(type_name, qualified_name, guid)
                for type_name, qualified_name, guid in chunk.select(
                    "type_name", "qualified_name", "guid"
                ).iter_rows()
            ],
            purge=purge,
        )
    edge_rows, attributes, type_names, qualified_names = references.of_rows(
        start, start + chunk.height
    )
    writes = EntityWrites(
        WriteColumns(
            chunk.get_column("type_name").to_list(),
            chunk.get_column("qualified_name").to_list(),
            chunk.get_column("entity").to_list(),
            chunk.get_column("hash").to_list(),
            chunk.get_column("guid").to_list(),
            [source] * chunk.height,
            edge_rows,
            attributes,
            type_names,
            qualified_names,
        )
    )
    return metastore.upsert(writes)


def next_snapshot(
    base: pl.DataFrame | pl.LazyFrame,
    operations: pl.DataFrame | pl.LazyFrame,
    results: pl.DataFrame | pl.LazyFrame,
) -> pl.LazyFrame:
    """The base snapshot with every successful operation applied, and no failed one: the base's
    rows in their order, less those the plan changed, then the plan's rows in plan order (the
    same plan on the same base always gives the same snapshot). Lazy: the base's file and the
    plan's stream through to the next snapshot, their payload never held whole.

    ``results``: one per operation (``execute_plan``'s). Each is set beside its operation by
    position, not joined: a streamed join buffered every entity of the plan."""
    results, seq = _in_plan_order(results)
    if not operations.lazy().select("seq").collect(engine="streaming").to_series().equals(seq):
        raise ValueError("the results are not one per operation of the plan, in its order")
    del seq
    outcomes = results.lazy().select(pl.col("ok").alias("_ok"), pl.col("guid").alias("_guid"))
    applied = pl.concat([operations.lazy(), outcomes], how="horizontal").filter(pl.col("_ok"))
    kept = base.lazy()
    # A first publish replaces nothing: its identities (gigabytes at millions) are not needed.
    if kept.select(pl.len()).collect().item():
        identity = pl.struct("type_name", "qualified_name")
        changed = applied.select(identity).collect(engine="streaming").to_series().implode()
        # A filter, not an anti-join: streamed, a join buffered gigabytes of a large snapshot.
        kept = kept.filter(~identity.is_in(changed))
    written = applied.filter(pl.col("op") != "delete").select(
        "type_name",
        "qualified_name",
        "hash",
        pl.coalesce(pl.col("_guid"), pl.col("guid")).alias("guid"),
        "entity",
        "references",
        "raw_hash",
    )
    return pl.concat(
        [kept.select(list(SNAPSHOT_SCHEMA)), written.cast(SNAPSHOT_SCHEMA)], how="vertical"
    )
