"""Relationships: reference edges added, removed and re-pointed by a plan and applied by publish;
dangling references isolated unless their target is in the batch, the snapshot or the metastore."""

from __future__ import annotations

import orjson
import polars as pl
import pytest

from publish_platform import plan as plan_module
from publish_platform.landing import RunRef
from publish_platform.metastores.base import EntityWrite
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.pipeline import read_plan, run_diff, run_plan, run_publish
from publish_platform.plan import EDGE_SCHEMA, preview

from .support import (
    SOURCE,
    catalog_identities,
    edges,
    entity,
    identities,
    identity,
    land_batch,
    ref,
    run_batch,
    small_source,
)

FIRST = RunRef("test", "wf", "run-1")
SECOND = RunRef("test", "wf", "run-2")


def q(path: str) -> str:
    return f"{SOURCE}/{path}"


def edge_rows(frame: pl.LazyFrame) -> set[tuple[str, ...]]:
    return set(frame.select(list(EDGE_SCHEMA)).collect().rows())


@pytest.fixture(params=["sqlite", "postgres"])
def any_catalog(request, settings):
    url = (
        settings.metastore_url
        if request.param == "sqlite"
        else request.getfixturevalue("make_postgres_database")()
    )
    catalog = SqlCatalog(url)
    yield catalog
    catalog.close()


def moved() -> list[dict]:
    """small_source a day later: column t1/c1 moved to table t2, table t2 moved to a new schema
    s2, a column t2/c3 added, column t1/c2 dropped."""
    batch = []
    for e in small_source():
        name = e["attributes"]["qualifiedName"]
        if name == q("db/s/t1/c2"):
            continue
        if name == q("db/s/t1/c1"):
            e["attributes"]["table"] = ref("Table", q("db/s/t2"))
        if name == q("db/s/t2"):
            e["attributes"]["atlanSchema"] = ref("Schema", q("db/s2"))
        batch.append(e)
    return [*batch, entity("Schema", "db/s2"), entity("Column", "db/s/t2/c3")]


def moved_edges_added() -> set[tuple[str, ...]]:
    return {
        ("Column", q("db/s/t1/c1"), "table", "Table", q("db/s/t2")),
        ("Table", q("db/s/t2"), "atlanSchema", "Schema", q("db/s2")),
        ("Schema", q("db/s2"), "database", "Database", q("db")),
        ("Column", q("db/s/t2/c3"), "table", "Table", q("db/s/t2")),
    }


def moved_edges_removed() -> set[tuple[str, ...]]:
    return {
        ("Column", q("db/s/t1/c1"), "table", "Table", q("db/s/t1")),
        ("Table", q("db/s/t2"), "atlanSchema", "Schema", q("db/s")),
        ("Column", q("db/s/t1/c2"), "table", "Table", q("db/s/t1")),  # deleted with its column
    }


def test_plan_reports_edges_added_removed_and_repointed_and_publish_applies_them(
    s3, state, settings, any_catalog
):
    catalog = any_catalog
    land_batch(s3, settings, FIRST, small_source(), source_timestamp="2026-01-01T00:00:00Z")
    _, first, _, _ = run_batch(s3, state, settings, catalog, FIRST)
    assert first.header.relationships_added == 7 and first.header.relationships_removed == 0
    assert catalog.relationships(SOURCE) == edges(small_source())

    land_batch(s3, settings, SECOND, moved(), source_timestamp="2026-01-02T00:00:00Z")
    diff, plan, checks, result = run_batch(s3, state, settings, catalog, SECOND)

    assert (diff.creates, diff.updates, diff.deletes) == (2, 2, 1)
    assert edge_rows(plan.edges_added) == moved_edges_added()
    assert edge_rows(plan.edges_removed) == moved_edges_removed()
    header = plan.header
    assert (header.relationships_added, header.relationships_removed) == (4, 3)
    assert header.relationships_repointed == 2  # the column's table, the table's schema
    references = next(c for c in checks if c.name == "references")
    assert references.passed
    assert references.metadata["relationships_repointed"] == 2
    assert "re-pointed 2" in preview(plan)

    assert result.outcome == "published" and result.failed == 0
    assert catalog.relationships(SOURCE) == edges(moved())
    assert catalog_identities(catalog) == identities(moved())


def connection_only_in_the_metastore(catalog: SqlCatalog) -> None:
    """The Connection is managed outside connector runs: the catalog has it, no batch does."""
    connection = entity("Connection")
    catalog.upsert([EntityWrite.of(connection, "connection-hash")])


def with_dangling() -> list[dict]:
    return [
        entity("Database", "db", connection=ref("Connection", SOURCE)),  # metastore only
        entity("Schema", "db/s"),
        entity("Table", "db/s/t1"),
        entity("Column", "db/s/t1/c1"),
        # A table in a schema nobody has: dangling.
        entity("Table", "db/s/orphan", atlanSchema=ref("Schema", q("db/missing"))),
        # Its children reference an entity that will not exist: isolated by cascade, two deep.
        entity("Column", "db/s/orphan/c1"),
        entity("TablePartition", "db/s/orphan/p", parentTable=ref("Table", q("db/s/orphan"))),
        entity(
            "Column",
            "db/s/orphan/p/c",
            table=None,
            tablePartition=ref("TablePartition", q("db/s/orphan/p")),
        ),
    ]


ISOLATED = {
    ("Table", q("db/s/orphan")),
    ("Column", q("db/s/orphan/c1")),
    ("TablePartition", q("db/s/orphan/p")),
    ("Column", q("db/s/orphan/p/c")),
}


def test_dangling_references_are_isolated_and_the_rest_publishes(s3, state, settings, catalog):
    connection_only_in_the_metastore(catalog)
    batch = with_dangling()
    land_batch(s3, settings, FIRST, batch)
    key = FIRST.partition_key
    run_diff(s3, state, settings, key)

    # Without the metastore to ask, the Connection is unknown: the Database dangles and with it,
    # by cascade, everything under it.
    _, blind, _ = run_plan(state, settings, key)
    assert set(blind.isolated.select("type_name", "qualified_name").rows()) == identities(batch)

    _, plan, checks = run_plan(state, settings, key, catalog)
    isolated = {(r["type_name"], r["qualified_name"]): r for r in plan.isolated.to_dicts()}
    assert set(isolated) == ISOLATED
    assert {r["reason"] for r in isolated.values()} == {"dangling_reference"}
    orphan = isolated[("Table", q("db/s/orphan"))]["message"]
    assert f"atlanSchema references Schema {q('db/missing')}" in orphan
    assert "neither the batch, the snapshot nor the metastore" in orphan
    child = isolated[("Column", q("db/s/orphan/p/c"))]["message"]
    assert f"tablePartition references TablePartition {q('db/s/orphan/p')}" in child
    assert ("Database", q("db")) not in isolated  # its target exists in the metastore
    assert set(plan.operations.select("type_name", "qualified_name").collect().rows()) == (
        identities(batch) - ISOLATED
    )
    assert plan.header.isolated_by_plan == 4 and plan.header.isolated == 4
    assert plan.header.creates == 4
    # A first batch: every edge of what is left is added, none of the isolated entities'.
    kept = [e for e in batch if identity(e) not in ISOLATED]
    assert plan.header.relationships_added == len(edges(kept)) == 4
    assert blind.header.relationships_added == 0

    by_name = {c.name: c for c in checks}
    references = by_name["references"]
    assert not references.passed and not references.blocking
    assert references.metadata["isolated_dangling"] == 4
    assert references.metadata["resolved_in_metastore"] == 1  # the Connection
    assert {row[1] for row in references.metadata["examples"]} == {qn for _, qn in ISOLATED}
    assert by_name["deletion_safety"].passed and by_name["scope"].passed
    # Stored with the plan, for operators.
    stored = read_plan(state, key).isolated
    assert set(stored.select("type_name", "qualified_name").rows()) == ISOLATED

    result = run_publish(state, settings, catalog, key)

    assert result.outcome == "published" and (result.succeeded, result.failed) == (4, 0)
    published = identities(batch) - ISOLATED
    assert catalog_identities(catalog) == published | {("Connection", SOURCE)}
    assert catalog.relationships(SOURCE) == edges([e for e in batch if identity(e) in published])
    snapshot = state.read_snapshot(SOURCE, 1)
    assert set(snapshot.select("type_name", "qualified_name").rows()) == published

    # Not in the snapshot, so the next batch of the source retries them: with the missing
    # schema now present, they publish; references to snapshot-only entities resolve.
    fixed = [
        *batch,
        entity("Schema", "db/missing"),
        entity("Column", "db/s/t1/c2"),
    ]
    land_batch(s3, settings, SECOND, fixed, source_timestamp="2026-01-02T00:00:00Z")
    _, retry, _, again = run_batch(s3, state, settings, catalog, SECOND)
    assert retry.isolated.height == 0
    assert retry.header.creates == 6 and retry.header.deletes == 0
    assert again.succeeded == 6
    assert catalog_identities(catalog) == identities(fixed) | {("Connection", SOURCE)}
    assert catalog.relationships(SOURCE) == edges(fixed)


def test_references_resolve_against_the_snapshot_in_an_incremental_batch(
    s3, state, settings, catalog
):
    land_batch(s3, settings, FIRST, small_source())
    run_batch(s3, state, settings, catalog, FIRST)
    # Only new columns: their tables are in the snapshot, not in the batch.
    partial = [
        entity("Column", "db/s/t1/c3"),
        entity("Column", "db/s/t2/c3"),
        entity("Column", "db/s/gone/c1"),  # its table exists nowhere
    ]
    land_batch(
        s3,
        settings,
        SECOND,
        partial,
        mode="incremental",
        source_timestamp="2026-01-02T00:00:00Z",
    )

    _, plan, _, result = run_batch(s3, state, settings, catalog, SECOND)

    assert plan.isolated.select("qualified_name").to_series().to_list() == [q("db/s/gone/c1")]
    assert plan.header.creates == 2 and result.succeeded == 2
    assert catalog_identities(catalog) == identities(small_source()) | {
        ("Column", q("db/s/t1/c3")),
        ("Column", q("db/s/t2/c3")),
    }
    stored = orjson.loads(state.get_bytes(state.batch_key(SECOND.partition_key, "plan.json"))[0])
    assert stored["isolated_by_plan"] == 1


def test_a_reference_to_an_entity_the_batch_deletes_dangles_though_the_metastore_has_it(
    s3, state, settings, catalog
):
    """t2 is still in the catalog while the plan is made, but this very plan archives it."""
    land_batch(s3, settings, FIRST, small_source())
    run_batch(s3, state, settings, catalog, FIRST)
    batch = [e for e in small_source() if "/t2" not in e["attributes"]["qualifiedName"]]
    batch.append(entity("Column", "db/s/t2/c3"))
    land_batch(s3, settings, SECOND, batch, source_timestamp="2026-01-02T00:00:00Z")

    _, plan, checks, result = run_batch(s3, state, settings, catalog, SECOND)

    assert plan.isolated.select("type_name", "qualified_name", "reason").rows() == [
        ("Column", q("db/s/t2/c3"), "dangling_reference")
    ]
    assert plan.header.deletes == 3 and plan.header.creates == 0
    references = next(c for c in checks if c.name == "references")
    assert references.metadata["resolved_in_metastore"] == 0
    assert result.succeeded == 3
    assert catalog_identities(catalog) == identities(batch) - {("Column", q("db/s/t2/c3"))}
    assert all(to_qn != q("db/s/t2") for *_, to_qn in catalog.relationships(SOURCE))


def test_edges_compared_a_few_operations_at_a_time_are_the_same(s3, state, settings, monkeypatch):
    """An entity's old edges are compared with its new ones only: a plan of many operations is
    compared a slice at a time, its edges written to files, with the same result."""
    monkeypatch.setattr(plan_module, "RELATIONSHIP_ROWS", 2)
    catalog = SqlCatalog(settings.metastore_url)
    land_batch(s3, settings, FIRST, small_source(), source_timestamp="2026-01-01T00:00:00Z")
    run_batch(s3, state, settings, catalog, FIRST)
    land_batch(s3, settings, SECOND, moved(), source_timestamp="2026-01-02T00:00:00Z")

    _, plan, _, _ = run_batch(s3, state, settings, catalog, SECOND)

    assert edge_rows(plan.edges_added) == moved_edges_added()
    assert edge_rows(plan.edges_removed) == moved_edges_removed()
    header = plan.header
    assert (header.relationships_added, header.relationships_removed) == (4, 3)
    assert header.relationships_repointed == 2
    edges_folder, _ = plan.keep
    assert len(list(edges_folder.path.glob("added-*.parquet"))) == -(-header.operations // 2)
    assert catalog.relationships(SOURCE) == edges(moved())
    catalog.close()
