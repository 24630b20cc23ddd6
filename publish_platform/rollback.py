"""Roll a source back to an older snapshot, through the same plan checks and publish path.

The older snapshot becomes a full batch of the source: it is diffed against the current
snapshot, planned, checked (a rollback that deletes much is held unless approved) and published
as the next serial. The source's data-age watermark is kept, so batches older than what was
published stay superseded.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, Field

from publish_platform.config import Settings
from publish_platform.diff import diff_batch
from publish_platform.entities import ENTITY_SCHEMA, ParsedEntities
from publish_platform.metastores.base import Metastore
from publish_platform.pipeline import (
    DiffSummary,
    PublishSummary,
    record_diff,
    run_plan,
    run_publish,
)
from publish_platform.plan import Approval, blocking_failures
from publish_platform.publish import Progress
from publish_platform.state import StateStore

ROLLBACK_APP = "rollback"


class RollbackResult(BaseModel):
    source: str
    partition_key: str
    from_serial: int
    to_serial: int
    outcome: Literal["published", "nothing_to_publish", "held"]
    held_by: list[str] = Field(default_factory=list)
    creates: int = 0
    updates: int = 0
    deletes: int = 0
    new_serial: int | None = None
    publish: PublishSummary | None = None


def rollback_key(source: str, to_serial: int) -> str:
    """A batch key for the state store's artifacts of this rollback (not a landing run)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-._")[:120] or "source"
    return f"{ROLLBACK_APP}/{slug}/to-{to_serial}-{uuid.uuid4().hex[:8]}"


def rollback(
    state: StateStore,
    settings: Settings,
    metastore: Metastore,
    source: str,
    to_serial: int,
    approval: Approval | None = None,
    progress: Progress | None = None,
) -> RollbackResult:
    found = state.read_pointer(source)
    if found is None:
        raise ValueError(f"nothing was ever published for {source}")
    current = found[0]
    if not 1 <= to_serial < current.serial:
        raise ValueError(
            f"{source} is at serial {current.serial}: roll back to 1…{current.serial - 1}"
        )
    target = state.read_snapshot(source, to_serial)
    base = state.read_snapshot(source, current.serial, payload=False)
    parsed = ParsedEntities(
        held=target.select(
            "type_name",
            "qualified_name",
            pl.lit(source).alias("connection_qualified_name"),
            "hash",
            "entity",
            "references",
            pl.lit(f"snapshot {to_serial}").alias("source_file"),
            (pl.int_range(pl.len()) + 1).cast(pl.Int64).alias("line"),
            "raw_hash",
            pl.lit(None, pl.String).alias("missing"),  # not known: the plan checks the JSON
            pl.lit(None, pl.UInt32).alias("entity_row"),
        ).cast(ENTITY_SCHEMA),
        issues=[],
        lines=target.height,
    )
    key = rollback_key(source, to_serial)
    summary = DiffSummary(
        partition_key=key,
        outcome="diffed",
        source=source,
        mode="full",
        source_timestamp=current.source_timestamp,
        files=0,
    )
    record_diff(state, summary, diff_batch(parsed, base, source, "full"), current.serial)
    _, plan, checks = run_plan(state, settings, key, metastore, approval)
    result = RollbackResult(
        source=source,
        partition_key=key,
        from_serial=current.serial,
        to_serial=to_serial,
        outcome="held",
        creates=plan.header.creates,
        updates=plan.header.updates,
        deletes=plan.header.deletes,
    )
    held = blocking_failures(checks)
    if held:
        result.held_by = [c.description for c in held]
        return result
    published = run_publish(state, settings, metastore, key, progress)
    result.publish = published
    result.outcome = "published" if published.outcome == "published" else "nothing_to_publish"
    result.new_serial = published.serial
    return result


def describe(result: RollbackResult) -> dict[str, Any]:
    return result.model_dump(mode="json", exclude_none=True)
