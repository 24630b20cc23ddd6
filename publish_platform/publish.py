"""Execute a plan against a metastore, chunk by chunk, and derive the next snapshot.

A chunk that fails is split in halves until the failing entities are isolated: the rest of the
batch is published, and each failed entity is recorded with its reason. Failed entities keep their
old snapshot row (or none), so the next batch of the source sees them as changed and retries them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    results: pl.DataFrame  # RESULT_SCHEMA, one row per operation
    requests: int = 0
    split_chunks: int = 0
    resumed: int = 0  # operations already applied by an earlier, interrupted attempt
    immediate_retries: int = 0  # tier 1: chunks retried in-step after a transient error
    duration_s: float = 0.0
    errors: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return int(self.results.filter(~pl.col("ok")).height)

    @property
    def succeeded(self) -> int:
        return int(self.results.filter(pl.col("ok")).height)


class Checkpoint(Protocol):
    """Durable per-chunk results, so a publish that died resumes where it stopped."""

    def done(self) -> pl.DataFrame: ...

    def record(self, results: pl.DataFrame) -> None: ...


def execute_plan(
    operations: pl.DataFrame,
    metastore: Metastore,
    chunk_size: int,
    purge: bool = False,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
    tiers: RetryTiers | None = None,
    on_retry: RetryObserver | None = None,
    source: str | None = None,
) -> PublishOutcome:
    """Apply every operation not already recorded in ``checkpoint``; return all results.

    ``source``: the batch's connection, which every entity of its plan belongs to (screened by
    the diff); it saves the metastore reading it out of each entity.
    """
    started = time.perf_counter()
    outcome = PublishOutcome(results=pl.DataFrame(schema=RESULT_SCHEMA))
    previous = checkpoint.done() if checkpoint is not None else outcome.results
    outcome.resumed = previous.height
    # In plan order (parents first): a join keeps row order only when asked to.
    remaining = operations.join(previous.select("seq"), on="seq", how="anti", maintain_order="left")
    parts = [previous]
    done = previous.height
    total = operations.height
    for chunk in _chunks(remaining, chunk_size):
        rows: list[tuple[int, bool, str | None, str | None]] = []
        for seq, result in _apply_isolating(
            chunk, metastore, purge, outcome, tiers or RetryTiers(), on_retry, source
        ):
            rows.append((seq, result.ok, result.guid, result.error))
            if not result.ok:
                outcome.errors.append(
                    {
                        "type_name": result.type_name,
                        "qualified_name": result.qualified_name,
                        "error": result.error,
                    }
                )
        part = pl.DataFrame(rows, schema=RESULT_SCHEMA, orient="row")
        if checkpoint is not None:
            checkpoint.record(part)
        parts.append(part)
        done += chunk.height
        if progress is not None:
            progress(done, total)
    outcome.results = pl.concat(parts, how="vertical").sort("seq")
    outcome.duration_s = time.perf_counter() - started
    return outcome


def _chunks(operations: pl.DataFrame, chunk_size: int) -> Iterator[pl.DataFrame]:
    """Consecutive operations of one kind (upsert or delete), at most chunk_size each: slices of
    the plan, so no row is copied into Python before its chunk is sent."""
    is_delete = operations.get_column("op").eq("delete").to_list()
    start, total = 0, len(is_delete)
    while start < total:
        end = start + 1
        while end < total and end - start < chunk_size and is_delete[end] == is_delete[start]:
            end += 1
        yield operations.slice(start, end - start)
        start = end


def _apply_isolating(
    chunk: pl.DataFrame,
    metastore: Metastore,
    purge: bool,
    outcome: PublishOutcome,
    tiers: RetryTiers,
    on_retry: RetryObserver | None,
    source: str | None,
) -> Iterator[tuple[int, WriteResult]]:
    def retried(attempt: int, exc: Exception) -> None:
        outcome.requests += 1
        outcome.immediate_retries += 1
        if on_retry is not None:
            on_retry(attempt, exc)

    outcome.requests += 1
    try:
        results = with_immediate_retries(
            lambda: _apply(chunk, metastore, purge, source), tiers, retried
        )
    except (TransientMetastoreError, MetastoreRefusedError):
        raise  # the metastore, not this chunk, is failing: splitting would not help (tier 2)
    except Exception as exc:  # noqa: BLE001 - any failure of a chunk is isolated, then reported
        if chunk.height == 1:
            row = chunk.row(0, named=True)
            message = f"{type(exc).__name__}: {exc}"[:2000]
            yield (
                row["seq"],
                WriteResult(row["type_name"], row["qualified_name"], False, None, message),
            )
            return
        outcome.split_chunks += 1
        middle = chunk.height // 2
        for half in (chunk.head(middle), chunk.slice(middle)):
            yield from _apply_isolating(half, metastore, purge, outcome, tiers, on_retry, source)
        return
    yield from zip(chunk.get_column("seq").to_list(), results, strict=True)


def _apply(
    chunk: pl.DataFrame, metastore: Metastore, purge: bool, source: str | None
) -> list[WriteResult]:
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
    return metastore.upsert(_writes(chunk, source))


def _writes(chunk: pl.DataFrame, source: str | None) -> EntityWrites:
    """The chunk's entities as columns: no object, tuple or dict is made per entity unless the
    metastore asks for one (at ~15 µs an entity for SQLite, they used to cost half as much)."""
    edges = (
        chunk.select(pl.int_range(pl.len()).alias("row"), "references")
        .explode("references")
        .drop_nulls("references")
        .unnest("references")
    )
    return EntityWrites(
        WriteColumns(
            chunk.get_column("type_name").to_list(),
            chunk.get_column("qualified_name").to_list(),
            chunk.get_column("entity").to_list(),
            chunk.get_column("hash").to_list(),
            chunk.get_column("guid").to_list(),
            [source] * chunk.height,
            edges.get_column("row").to_list(),
            edges.get_column("attribute").to_list(),
            edges.get_column("type_name").to_list(),
            edges.get_column("qualified_name").to_list(),
        )
    )


def next_snapshot(
    base: pl.DataFrame, operations: pl.DataFrame, results: pl.DataFrame
) -> pl.DataFrame:
    """The base snapshot with every successful operation applied, and no failed one."""
    applied = operations.join(results, on="seq", how="inner").filter(pl.col("ok"))
    identity = ["type_name", "qualified_name"]
    kept = base.join(applied.select(identity), on=identity, how="anti")
    written = applied.filter(pl.col("op") != "delete").select(
        "type_name",
        "qualified_name",
        "hash",
        pl.coalesce(pl.col("guid_right"), pl.col("guid")).alias("guid"),
        "entity",
        "references",
        "raw_hash",
    )
    return pl.concat([kept.select(list(SNAPSHOT_SCHEMA)), written], how="vertical").sort(identity)
