"""Compare a batch with its source's current snapshot.

First the batch is screened: entities that cannot be published (another source's, unknown type,
one identity with two contents) are isolated and reported, never silently dropped. Then the rest
is joined with the snapshot on identity and compared by content hash: volatile attributes are not
in the hash, so a batch that only changed them is all "unchanged".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from publish_platform.entities import EntityIssue, ParsedEntities
from publish_platform.state import SNAPSHOT_SCHEMA

Mode = Literal["full", "incremental"]

# Types this platform knows how to order and publish (Atlas SQL asset model), parents first.
TYPE_RANK: dict[str, int] = {
    "Connection": 0,
    "Database": 1,
    "Schema": 2,
    "Table": 3,
    "View": 3,
    "MaterialisedView": 3,
    "Procedure": 3,
    "Function": 3,
    "SnowflakeDynamicTable": 3,
    "TablePartition": 4,
    "Column": 5,
}

# What a diff holds per entity: the snapshot's columns plus the operation.
DIFF_SCHEMA = {"op": pl.String, **SNAPSHOT_SCHEMA}

IDENTITY = ["type_name", "qualified_name"]


@dataclass
class DiffResult:
    source: str
    mode: Mode
    changes: pl.DataFrame  # DIFF_SCHEMA: create / update / unchanged / delete rows
    lines: int
    valid_entities: int
    snapshot_entities: int
    issues: list[EntityIssue] = field(default_factory=list)
    deletions_withheld: str | None = None

    def count(self, op: str) -> int:
        return int(self.changes.filter(pl.col("op") == op).height)

    @property
    def isolated(self) -> int:
        return len(self.issues)

    def issue_counts(self) -> dict[str, int]:
        return dict(Counter(issue.reason for issue in self.issues))


def recognisable(snapshot: pl.DataFrame) -> pl.DataFrame:
    """The snapshot's raw hashes: batch lines with one of these are unchanged (not parsed)."""
    return snapshot.select("raw_hash").drop_nulls().unique()


def derive_source(parsed: ParsedEntities) -> str | list[str]:
    """The batch's connection, from its data: exactly one, or the list of all it names."""
    connections = parsed.frame.get_column("connection_qualified_name").unique().sort().to_list()
    return connections[0] if len(connections) == 1 else connections


def diff_batch(
    parsed: ParsedEntities,
    snapshot: pl.DataFrame,
    source: str,
    mode: Mode,
    force: bool = False,
) -> DiffResult:
    """Screen the batch, then compute creates, updates and (full mode) deletes against snapshot.

    ``force`` re-sends every entity of the batch as an update even if unchanged (a republish
    that repairs a drifted metastore); deletions are computed as usual.
    """
    batch, issues = screen(_with_recognised(parsed, snapshot, source), source, parsed.issues)
    protected = _protected_identities(issues)

    joined = batch.join(
        snapshot.select([*IDENTITY, pl.col("hash").alias("old_hash"), "guid"]),
        on=IDENTITY,
        how="left",
    )
    is_new = pl.col("old_hash").is_null()
    changed = is_new | (pl.col("hash") != pl.col("old_hash")) | pl.lit(force)
    upserts = joined.filter(changed).with_columns(
        op=pl.when(is_new).then(pl.lit("create")).otherwise(pl.lit("update"))
    )
    # Unchanged rows keep identity, hash and guid (no payload): the plan needs the whole batch.
    kept = joined.filter(~changed).with_columns(
        op=pl.lit("unchanged"), entity=pl.lit(None, pl.String)
    )

    deletions_withheld = None
    deletes = pl.DataFrame(schema=DIFF_SCHEMA)
    if mode == "full":
        unidentified = [i for i in issues if i.qualified_name is None or i.type_name is None]
        if unidentified:
            deletions_withheld = (
                f"{len(unidentified)} line(s) without an identity: an absent entity may be one"
                " of them, so no deletion is inferred from this batch"
            )
        else:
            missing = snapshot.join(batch.select(IDENTITY), on=IDENTITY, how="anti")
            if protected:
                missing = missing.join(
                    pl.DataFrame(sorted(protected), schema=IDENTITY, orient="row"),
                    on=IDENTITY,
                    how="anti",
                )
            deletes = missing.with_columns(op=pl.lit("delete")).select(list(DIFF_SCHEMA))

    changes = pl.concat(
        [upserts.select(list(DIFF_SCHEMA)), kept.select(list(DIFF_SCHEMA)), deletes],
        how="vertical",
    )
    return DiffResult(
        source=source,
        mode=mode,
        changes=changes,
        lines=parsed.lines,
        valid_entities=parsed.frame.height + parsed.unchanged.height,
        snapshot_entities=snapshot.height,
        issues=issues,
        deletions_withheld=deletions_withheld,
    )


def _with_recognised(parsed: ParsedEntities, snapshot: pl.DataFrame, source: str) -> pl.DataFrame:
    """The parsed entities plus the lines recognised as unchanged, which take identity, hash and
    references from their snapshot row (no payload: they are not sent)."""
    if parsed.unchanged.height == 0:
        return parsed.frame
    recognised = parsed.unchanged.join(
        snapshot.select([*IDENTITY, "hash", "references", "raw_hash"]).unique("raw_hash"),
        on="raw_hash",
        how="inner",
    ).with_columns(connection_qualified_name=pl.lit(source), entity=pl.lit(None, pl.String))
    return pl.concat([parsed.frame, recognised.select(parsed.frame.columns)], how="vertical")


def screen(
    frame: pl.DataFrame, source: str, issues: list[EntityIssue] | None = None
) -> tuple[pl.DataFrame, list[EntityIssue]]:
    """Isolate what cannot be published: wrong source, unknown type, conflicting duplicates."""
    issues = list(issues or [])

    def isolate(mask: pl.Expr, reason: str, message: str) -> None:
        nonlocal frame
        bad = frame.filter(mask)
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

    isolate(
        pl.col("connection_qualified_name") != source,
        "wrong_source",
        f"belongs to connection {{connection_qualified_name}}, not to this batch's {source}",
    )
    isolate(
        (pl.col("qualified_name") != source)
        & ~pl.col("qualified_name").str.starts_with(source + "/"),
        "wrong_source",
        f"qualifiedName {{qualified_name}} lies outside the namespace of connection {source}",
    )
    isolate(
        ~pl.col("type_name").is_in(list(TYPE_RANK)),
        "unknown_type",
        "typeName {type_name} is not a type this platform publishes",
    )
    conflicting = pl.col("hash").n_unique().over(IDENTITY) > 1
    isolate(
        conflicting,
        "conflicting_duplicate",
        "identity appears more than once with different content; none of them is published",
    )
    # Exact duplicates (same identity, same content) are harmless: keep the first.
    frame = frame.unique(subset=IDENTITY, keep="first", maintain_order=True)
    return frame, issues


def _protected_identities(issues: list[EntityIssue]) -> set[tuple[str, str]]:
    """Identities present in the batch but isolated: their absence is not a deletion."""
    return {
        (issue.type_name, issue.qualified_name)
        for issue in issues
        if issue.type_name and issue.qualified_name and issue.reason != "wrong_source"
    }
