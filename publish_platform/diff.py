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

import numpy as np
import polars as pl

from publish_platform.entities import EntityIssue, KnownLines, ParsedEntities
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
    changes: pl.DataFrame  # DIFF_SCHEMA: create / update / delete rows
    lines: int
    valid_entities: int
    snapshot_entities: int
    issues: list[EntityIssue] = field(default_factory=list)
    deletions_withheld: str | None = None
    unchanged: int = 0  # entities of the batch equal to their snapshot row (not listed)
    # The snapshot compared against: where the plan finds the unchanged entities.
    snapshot: pl.DataFrame | None = field(default=None, repr=False)

    def count(self, op: str) -> int:
        if op == "unchanged":
            return self.unchanged
        return int(self.changes.filter(pl.col("op") == op).height)

    @property
    def isolated(self) -> int:
        return len(self.issues)

    def issue_counts(self) -> dict[str, int]:
        return dict(Counter(issue.reason for issue in self.issues))


def streamed_join(
    left: pl.DataFrame,
    right: pl.DataFrame,
    on: str | list[str],
    how: Literal["inner", "semi", "anti"] = "inner",
) -> pl.DataFrame:
    """A join of a batch's few rows with a snapshot's many, in polars' streaming engine: the
    snapshot's keys are never encoded all at once (an eager join on two text columns costs
    about 150 MB per million snapshot rows). Row order is not kept."""
    return left.lazy().join(right.lazy(), on=on, how=how).collect(engine="streaming")


def recognisable(snapshot: pl.DataFrame) -> KnownLines:
    """The snapshot's raw hashes, each with its row: batch lines with one of these are unchanged
    (not parsed), and take identity, hash and guid from that row."""
    return KnownLines(snapshot.select("raw_hash").with_row_index("snapshot_row"))


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

    Most of a batch is lines recognised as unchanged (``parsed.unchanged``): they point at their
    snapshot rows, so only the parsed lines are joined with the snapshot (by inner join: the
    small side is hashed), and deletions are the snapshot rows nothing in the batch points at.
    """
    if force and parsed.unchanged.height:
        raise ValueError("a forced diff re-sends every entity: parse every line (no known_raw)")
    indexed = snapshot.with_row_index("snapshot_row")
    # Recognised lines stay snapshot row numbers (no identity is copied for them). Those whose
    # entity also appears on a parsed line are screened with it: a duplicate, or a conflict
    # that isolates both.
    recognised_rows = parsed.unchanged.get_column("snapshot_row")
    parsed_rows = streamed_join(
        parsed.frame.select(IDENTITY), indexed.select(*IDENTITY, "snapshot_row"), IDENTITY
    )
    overlap = (
        parsed.unchanged.join(parsed_rows.select("snapshot_row"), on="snapshot_row", how="semi")
        .unique("snapshot_row", keep="first", maintain_order=True)
        .join(indexed.select("snapshot_row", *IDENTITY, "hash", "references"), on="snapshot_row")
    )
    candidates = pl.concat(
        [
            parsed.frame,
            overlap.select(
                *IDENTITY,
                connection_qualified_name=pl.lit(source),
                hash="hash",
                entity=pl.lit(None, pl.String),
                references="references",
                source_file="source_file",
                line="line",
                raw_hash="raw_hash",
            ),
        ],
        how="vertical",
    )
    batch, issues = screen(candidates, source, parsed.issues)
    protected = _protected_identities(issues)

    found = streamed_join(
        batch,
        indexed.select(*IDENTITY, "snapshot_row", pl.col("hash").alias("old_hash"), "guid"),
        IDENTITY,
    )
    creates = batch.join(found.select(IDENTITY), on=IDENTITY, how="anti").with_columns(
        op=pl.lit("create"), guid=pl.lit(None, pl.String)
    )
    changed = (pl.col("hash") != pl.col("old_hash")) | pl.lit(force)
    updates = found.filter(changed).with_columns(op=pl.lit("update"))
    # Unchanged entities are counted, not listed: the next snapshot keeps them from the base.
    unchanged = found.height - updates.height + recognised_rows.n_unique() - overlap.height

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
            present = pl.concat([recognised_rows, found.get_column("snapshot_row")])
            if protected:
                present = pl.concat(
                    [
                        present,
                        indexed.join(
                            pl.DataFrame(sorted(protected), schema=IDENTITY, orient="row"),
                            on=IDENTITY,
                            how="inner",
                        ).get_column("snapshot_row"),
                    ]
                )
            absent = pl.Series(np.ones(snapshot.height, dtype=bool)).scatter(present, False)
            deletes = (
                snapshot.filter(absent).with_columns(op=pl.lit("delete")).select(list(DIFF_SCHEMA))
            )

    changes = pl.concat(
        [
            pl.concat([updates.drop("old_hash", "snapshot_row"), creates], how="diagonal").select(
                list(DIFF_SCHEMA)
            ),
            deletes,
        ],
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
        unchanged=unchanged,
        snapshot=snapshot,
    )


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
