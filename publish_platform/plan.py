"""Turn a diff into an ordered, checked plan.

Order: creates and updates parents first (Connection → Database → Schema → Table… → Column),
then deletes children first. The plan pins the snapshot serial it was computed against, so it can
only ever be applied on top of that state. Checks are pure functions of the stored plan: the
Dagster asset checks only report what they return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import polars as pl
from pydantic import BaseModel, Field

from publish_platform.diff import DIFF_SCHEMA, IDENTITY, TYPE_RANK, DiffResult, Mode

PLAN_SCHEMA = {"seq": pl.Int64, **DIFF_SCHEMA}
REQUIRED_ATTRIBUTES = ("qualifiedName", "name", "connectionQualifiedName")


class PlanHeader(BaseModel):
    """Everything about a plan but its operations; stored as plan.json beside plan.parquet."""

    partition_key: str
    source: str
    mode: Mode
    base_serial: int
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source_timestamp: datetime | None = None
    creates: int = 0
    updates: int = 0
    deletes: int = 0
    unchanged: int = 0
    batch_entities: int = 0
    snapshot_entities: int = 0
    isolated: int = 0
    deletions_withheld: str | None = None
    forced: bool = False

    @property
    def operations(self) -> int:
        return self.creates + self.updates + self.deletes


@dataclass
class Plan:
    header: PlanHeader
    operations: pl.DataFrame  # PLAN_SCHEMA, in execution order
    batch_identities: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(
            schema={"type_name": pl.String, "qualified_name": pl.String}
        )
    )


def build_plan(
    diff: DiffResult,
    partition_key: str,
    base_serial: int,
    source_timestamp: datetime | None = None,
    forced: bool = False,
) -> Plan:
    rank = pl.col("type_name").replace_strict(TYPE_RANK, default=len(TYPE_RANK))
    changes = diff.changes
    upserts = changes.filter(pl.col("op").is_in(["create", "update"])).sort(
        [rank, pl.col("qualified_name")]
    )
    deletes = changes.filter(pl.col("op") == "delete").sort(
        [rank, pl.col("qualified_name")], descending=[True, False]
    )
    ordered = pl.concat([upserts, deletes], how="vertical").with_row_index("seq")
    operations = ordered.with_columns(pl.col("seq").cast(pl.Int64)).select(list(PLAN_SCHEMA))
    header = PlanHeader(
        partition_key=partition_key,
        source=diff.source,
        mode=diff.mode,
        base_serial=base_serial,
        source_timestamp=source_timestamp,
        creates=diff.count("create"),
        updates=diff.count("update"),
        deletes=diff.count("delete"),
        unchanged=diff.count("unchanged"),
        batch_entities=changes.filter(pl.col("op") != "delete").height,
        snapshot_entities=diff.snapshot_entities,
        isolated=diff.isolated,
        deletions_withheld=diff.deletions_withheld,
        forced=forced,
    )
    batch_identities = changes.filter(pl.col("op") != "delete").select(IDENTITY)
    return Plan(header=header, operations=operations, batch_identities=batch_identities)


def preview(plan: Plan, limit: int = 20) -> str:
    """A short Markdown table of the first operations, for the Dagster UI."""
    ops = plan.operations.head(limit)
    lines = ["| # | op | type | qualifiedName |", "|---|---|---|---|"]
    for row in ops.iter_rows(named=True):
        lines.append(
            f"| {row['seq']} | {row['op']} | {row['type_name']} | `{row['qualified_name']}` |"
        )
    more = plan.operations.height - ops.height
    if more > 0:
        lines.append(f"| … | {more} more | | |")
    if plan.operations.height == 0:
        lines.append("| | nothing to do | | |")
    return "\n".join(lines)


# --- checks ----------------------------------------------------------------------------------


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def check_scope(plan: Plan) -> CheckOutcome:
    """Every operation touches the batch's own connection, by attribute and by namespace."""
    source = plan.header.source
    ops = plan.operations
    connections = ops.select(
        pl.col("entity").map_elements(_connection_of, return_dtype=pl.String).alias("connection"),
        *IDENTITY,
    )
    outside = connections.filter(
        (pl.col("connection") != source)
        | (
            (pl.col("qualified_name") != source)
            & ~pl.col("qualified_name").str.starts_with(source + "/")
        )
    )
    examples = outside.head(5).rows()
    return CheckOutcome(
        name="scope",
        passed=outside.height == 0,
        blocking=True,
        description=(
            f"all {ops.height} operations are within {source}"
            if outside.height == 0
            else f"{outside.height} operation(s) touch entities outside {source}"
        ),
        metadata={"out_of_scope": outside.height, "examples": [list(r) for r in examples]},
    )


def _connection_of(entity_json: str | None) -> str | None:
    if entity_json is None:
        return None
    attributes = orjson.loads(entity_json).get("attributes") or {}
    return attributes.get("connectionQualifiedName")


def check_deletion_safety(plan: Plan, threshold: float) -> CheckOutcome:
    """Hold a batch that would delete too much of its source, or that is empty."""
    header = plan.header
    share = header.deletes / header.snapshot_entities if header.snapshot_entities else 0.0
    metadata = {
        "deletes": header.deletes,
        "snapshot_entities": header.snapshot_entities,
        "deletion_share": round(share, 4),
        "threshold": threshold,
    }
    if header.mode == "full" and header.batch_entities == 0 and header.snapshot_entities > 0:
        return CheckOutcome(
            "deletion_safety",
            False,
            True,
            f"empty full batch would delete all {header.snapshot_entities} entities of"
            f" {header.source}: held for an operator",
            metadata,
        )
    if share > threshold:
        return CheckOutcome(
            "deletion_safety",
            False,
            True,
            f"batch deletes {share:.0%} of {header.source} (threshold {threshold:.0%}):"
            " held for an operator",
            metadata,
        )
    return CheckOutcome(
        "deletion_safety",
        True,
        True,
        f"deletes {header.deletes} of {header.snapshot_entities} ({share:.0%}), within"
        f" {threshold:.0%}",
        metadata,
    )


def check_references(plan: Plan, snapshot: pl.DataFrame) -> CheckOutcome:
    """Report references whose target is neither in the batch nor in the published snapshot."""
    known = pl.concat([plan.batch_identities, snapshot.select(IDENTITY)], how="vertical").unique()
    deleted = plan.operations.filter(pl.col("op") == "delete").select(IDENTITY)
    known = known.join(deleted, on=IDENTITY, how="anti")
    refs = (
        plan.operations.filter(pl.col("op") != "delete")
        .select(pl.col("qualified_name").alias("from"), "references")
        .explode("references")
        .drop_nulls("references")
        .unnest("references")
    )
    dangling = refs.join(known, on=IDENTITY, how="anti")
    return CheckOutcome(
        name="references",
        passed=dangling.height == 0,
        blocking=False,
        description=(
            f"all {refs.height} references resolve"
            if dangling.height == 0
            else f"{dangling.height} of {refs.height} references point to unknown entities"
        ),
        metadata={
            "references": refs.height,
            "dangling": dangling.height,
            "examples": [list(r) for r in dangling.head(5).rows()],
        },
    )


def check_required_attributes(plan: Plan) -> CheckOutcome:
    """Report creates/updates without the attributes every asset needs."""
    missing = []
    for row in plan.operations.filter(pl.col("op") != "delete").iter_rows(named=True):
        attributes = orjson.loads(row["entity"]).get("attributes") or {}
        absent = [name for name in REQUIRED_ATTRIBUTES if attributes.get(name) in (None, "")]
        if absent:
            missing.append([row["type_name"], row["qualified_name"], absent])
    return CheckOutcome(
        name="required_attributes",
        passed=not missing,
        blocking=False,
        description=(
            "every entity has " + ", ".join(REQUIRED_ATTRIBUTES)
            if not missing
            else f"{len(missing)} entities lack required attributes"
        ),
        metadata={"missing": len(missing), "examples": missing[:5]},
    )
