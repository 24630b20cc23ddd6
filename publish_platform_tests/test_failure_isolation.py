"""Failure isolation on a real PostgreSQL catalog: one entity the database rejects among 500
leaves 499 published and 1 reported; kept out of the snapshot, it is retried by the next batch.

The poison is a NUL character in the qualifiedName, which lands in a TEXT column that PostgreSQL
rejects. (A NUL in any other attribute is accepted: the entity is stored as JSON text, where it
is escaped as ``\\u0000``.)
"""

from __future__ import annotations

import pytest

from publish_platform.landing import RunRef
from publish_platform.metastores.sql import SqlCatalog

from .support import SOURCE, catalog_identities, entity, identities, land_batch, run_batch

FIRST = RunRef("test", "wf", "run-1")
SECOND = RunRef("test", "wf", "run-2")
THIRD = RunRef("test", "wf", "run-3")
POISON = f"{SOURCE}/db/s/t3/c\u0000bad"
FIXED = f"{SOURCE}/db/s/t3/cbad"


def five_hundred(poisoned: bool = True) -> list[dict]:
    """Database, schema, 10 tables, 488 columns: the last column of t3 is the poison."""
    entities = [entity("Database", "db"), entity("Schema", "db/s")]
    entities += [entity("Table", f"db/s/t{t}") for t in range(10)]
    entities += [entity("Column", f"db/s/t{i % 10}/c{i}") for i in range(487)]
    last = entity("Column", "db/s/t3/cbad")
    if poisoned:
        last["attributes"].update(qualifiedName=POISON, name="c\u0000bad")
    return [*entities, last]


@pytest.fixture
def postgres_catalog(make_postgres_database):
    catalog = SqlCatalog(make_postgres_database())
    yield catalog
    catalog.close()


def test_poison_entity_among_500_leaves_499_published_and_1_reported(
    s3, state, settings, postgres_catalog
):
    catalog = postgres_catalog
    batch = five_hundred()
    assert len(batch) == 500 and len(identities(batch)) == 500
    land_batch(s3, settings, FIRST, batch, source_timestamp="2026-01-01T00:00:00Z")

    diff, plan, checks, result = run_batch(s3, state, settings, catalog, FIRST)

    assert diff.creates == 500 and plan.isolated.height == 0
    assert all(c.passed for c in checks)
    assert result.outcome == "published" and result.serial == 1
    assert (result.succeeded, result.failed) == (499, 1)
    (failure,) = result.failures_preview
    assert (failure["type_name"], failure["qualified_name"]) == ("Column", POISON)
    assert failure["error"] == "ValueError: A string literal cannot contain NUL (0x00) characters."
    # One request of 500 failed and was halved down to the poison: ~log2(500) splits.
    assert result.split_chunks >= 9 and result.requests == 1 + 2 * result.split_chunks
    assert catalog_identities(catalog) == identities(batch) - {("Column", POISON)}
    snapshot = state.read_snapshot(SOURCE, 1)
    assert snapshot.height == 499 and POISON not in snapshot["qualified_name"]
    assert state.read_pointer(SOURCE)[0].entities == 499

    # The next batch of the source retries it (it is not in the snapshot): still poisoned, it
    # fails again, alone; nothing else is rewritten.
    versions = catalog.versions(SOURCE)
    land_batch(s3, settings, SECOND, batch, source_timestamp="2026-01-02T00:00:00Z")
    diff, plan, _, retried = run_batch(s3, state, settings, catalog, SECOND)
    assert (diff.creates, diff.unchanged, diff.deletes) == (1, 499, 0)
    assert plan.operations.collect()["qualified_name"].to_list() == [POISON]
    assert (retried.succeeded, retried.failed) == (0, 1)
    assert catalog.versions(SOURCE) == versions

    # Fixed at the source, it publishes.
    fixed = five_hundred(poisoned=False)
    land_batch(s3, settings, THIRD, fixed, source_timestamp="2026-01-03T00:00:00Z")
    diff, _, _, published = run_batch(s3, state, settings, catalog, THIRD)
    assert (diff.creates, diff.deletes) == (1, 0)
    assert (published.succeeded, published.failed) == (1, 0)
    assert catalog_identities(catalog) == identities(fixed)
    assert ("Column", FIXED) in identities(fixed)
    assert state.read_snapshot(SOURCE, 3).height == 500
