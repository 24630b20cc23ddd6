"""The local SQL catalog, on SQLite and on a real PostgreSQL: one schema, same behaviour."""

from __future__ import annotations

import sqlite3
import time
import uuid
from contextlib import closing

import orjson
import pytest
import sqlalchemy as sa

from publish_platform.config import Settings
from publish_platform.metastores import open_metastore
from publish_platform.metastores.base import EntityWrite, Identity, WriteResult
from publish_platform.metastores.sql import (
    ROWS_PER_STATEMENT,
    SqlCatalog,
    _statement_parts,
    new_guid,
    new_guids,
)

from .support import SOURCE, entity

OTHER = "default/other/2"


@pytest.fixture(params=["sqlite", "postgres"])
def catalog_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'catalog.sqlite'}"
    return request.getfixturevalue("make_postgres_database")()


@pytest.fixture
def catalog(catalog_url):
    catalog = open_metastore(Settings(metastore=catalog_url))
    assert isinstance(catalog, SqlCatalog)
    yield catalog
    catalog.close()


def write(type_name: str, path: str, source: str = SOURCE, guid: str | None = None, **attrs):
    e = entity(type_name, path, source, **attrs)
    return EntityWrite.of(e, f"hash-{path}", guid)


def test_upsert_creates_with_guid_and_reupsert_keeps_it(catalog):
    first = catalog.upsert([write("Database", "db"), write("Schema", "db/s")])
    assert [r.ok for r in first] == [True, True]
    guids = {r.qualified_name: r.guid for r in first}
    assert all(len(g) == 36 for g in guids.values())
    assert len(set(guids.values())) == 2

    again = catalog.upsert([write("Schema", "db/s", description="changed")])
    assert again[0].guid == guids[f"{SOURCE}/db/s"]
    versions = catalog.versions(SOURCE)
    assert versions == {("Database", f"{SOURCE}/db"): 1, ("Schema", f"{SOURCE}/db/s"): 2}
    dumped = {e["attributes"]["qualifiedName"]: e for e in catalog.dump(SOURCE)}
    assert dumped[f"{SOURCE}/db/s"]["attributes"]["description"] == "changed"
    assert dumped[f"{SOURCE}/db/s"]["guid"] == guids[f"{SOURCE}/db/s"]


def test_upsert_honours_a_known_guid(catalog):
    result = catalog.upsert([write("Table", "db/s/t", guid="00000000-0000-4000-8000-000000000001")])
    assert result[0].guid == "00000000-0000-4000-8000-000000000001"


def test_entity_payload_round_trips_with_nulls_and_unicode(catalog):
    w = write("Column", "db/s/t/ç", description=None, comment="naïve – ✓", numericScale=0.0)
    catalog.upsert([w])
    (dumped,) = list(catalog.dump(SOURCE))
    guid = dumped.pop("guid")
    assert guid
    assert dumped == w.entity


def test_archive_hides_from_dump_and_upsert_revives(catalog):
    created = catalog.upsert([write("Database", "db"), write("Schema", "db/s")])
    archived = catalog.delete([Identity("Schema", f"{SOURCE}/db/s")])
    assert archived[0].ok and archived[0].guid == created[1].guid
    assert [e["typeName"] for e in catalog.dump(SOURCE)] == ["Database"]
    assert catalog.versions(SOURCE)[("Schema", f"{SOURCE}/db/s")] == 2  # still stored

    # Archiving twice, or something never stored, succeeds and changes nothing.
    again = catalog.delete([Identity("Schema", f"{SOURCE}/db/s"), Identity("Table", "nowhere")])
    assert [r.ok for r in again] == [True, True]
    assert again[1].guid is None
    assert catalog.versions(SOURCE)[("Schema", f"{SOURCE}/db/s")] == 2

    revived = catalog.upsert([write("Schema", "db/s")])
    assert revived[0].guid == created[1].guid
    assert {e["typeName"] for e in catalog.dump(SOURCE)} == {"Database", "Schema"}


def test_purge_removes(catalog):
    catalog.upsert([write("Database", "db"), write("Schema", "db/s")])
    purged = catalog.delete([Identity("Schema", f"{SOURCE}/db/s")], purge=True)
    assert purged[0].ok and purged[0].guid
    assert list(catalog.versions(SOURCE)) == [("Database", f"{SOURCE}/db")]
    fresh = catalog.upsert([write("Schema", "db/s")])
    assert fresh[0].guid != purged[0].guid  # a purged entity comes back as a new one


def test_dump_is_filtered_by_source_and_ordered(catalog):
    catalog.upsert([write("Table", "db/s/b"), write("Database", "db"), write("Table", "db/s/a")])
    catalog.upsert([write("Database", "db", source=OTHER)])
    ours = [(e["typeName"], e["attributes"]["qualifiedName"]) for e in catalog.dump(SOURCE)]
    assert ours == [
        ("Database", f"{SOURCE}/db"),
        ("Table", f"{SOURCE}/db/s/a"),
        ("Table", f"{SOURCE}/db/s/b"),
    ]
    assert [e["attributes"]["qualifiedName"] for e in catalog.dump(OTHER)] == [f"{OTHER}/db"]
    assert len(list(catalog.dump())) == 4
    assert set(catalog.versions(OTHER)) == {("Database", f"{OTHER}/db")}


def test_one_identity_per_type(catalog):
    """The same qualified name under two types is two entities."""
    catalog.upsert([write("Table", "db/s/x"), write("View", "db/s/x")])
    assert len(catalog.versions(SOURCE)) == 2


def test_reopening_keeps_the_catalog(catalog_url):
    first = SqlCatalog(catalog_url)
    guid = first.upsert([write("Database", "db")])[0].guid
    first.close()
    second = SqlCatalog(catalog_url)  # create_all is idempotent
    try:
        assert [e["guid"] for e in second.dump(SOURCE)] == [guid]
        dialect = second.engine.dialect.name
        assert dialect == ("sqlite" if catalog_url.startswith("sqlite") else "postgresql")
        with second.engine.connect() as connection:
            count = connection.execute(sa.text("select count(*) from catalog_entities")).scalar()
        assert count == 1
    finally:
        second.close()


def test_a_new_sqlite_catalog_has_16_kib_pages_and_an_existing_one_keeps_its_own(tmp_path):
    """Large pages make the first publish of a source cheaper; a file made before keeps working."""
    new, old = tmp_path / "new.sqlite", tmp_path / "old.sqlite"
    with closing(sqlite3.connect(old)) as connection:
        connection.execute("PRAGMA page_size=4096")
        connection.execute("PRAGMA journal_mode=WAL")
    for path in (new, old):
        catalog = SqlCatalog(f"sqlite:///{path}")
        catalog.upsert([write("Database", "db")])
        assert len(list(catalog.dump(SOURCE))) == 1
        catalog.close()
    sizes = {}
    for path in (new, old):
        with closing(sqlite3.connect(path)) as connection:
            sizes[path.name] = connection.execute("PRAGMA page_size").fetchone()[0]
    assert sizes == {"new.sqlite": 16384, "old.sqlite": 4096}


def test_a_chunk_whose_edges_fail_writes_none_of_its_entities(catalog):
    """Entities and their edges are one transaction: a failed chunk leaves nothing behind."""
    catalog.upsert([write("Database", "db")])
    broken = {"attribute": None, "type_name": "Database", "qualified_name": f"{SOURCE}/db"}
    writes = [
        write("Database", "db", description="changed"),
        EntityWrite.of(entity("Schema", "db/s", SOURCE), "hash-s", None, (broken,)),
    ]
    with pytest.raises(sa.exc.IntegrityError):
        catalog.upsert(writes)
    assert catalog.versions(SOURCE) == {("Database", f"{SOURCE}/db"): 1}


def edge(type_name: str, path: str, attribute: str = "parent") -> dict[str, str]:
    return {"attribute": attribute, "type_name": type_name, "qualified_name": f"{SOURCE}/{path}"}


def test_a_chunk_mixing_new_known_and_unrecognised_entities(catalog):
    """New entities are inserted with minted guids; one the caller has no guid for but the catalog
    has keeps its guid, gets its version bumped and its edges replaced, like one with a guid."""
    first = catalog.upsert(
        [
            EntityWrite.of(entity("Table", "db/s/a"), "h", None, (edge("Schema", "db/s"),)),
            EntityWrite.of(entity("Table", "db/s/b"), "h", None, (edge("Schema", "db/s"),)),
        ]
    )
    guid_a, guid_b = (r.guid for r in first)
    writes = [
        EntityWrite.of(entity("Table", "db/s/new"), "h", None, (edge("Schema", "db/s"),)),
        EntityWrite.of(entity("Table", "db/s/a"), "h2", None, (edge("Schema", "db/s2"),)),
        EntityWrite.of(entity("Table", "db/s/b"), "h2", guid_b, (edge("Schema", "db/s3"),)),
        EntityWrite.of(entity("Table", "db/s/known"), "h", "00000000-0000-4000-8000-00000000000a"),
    ]
    results = catalog.upsert(writes)

    assert [r.ok for r in results] == [True] * 4
    assert [r.qualified_name for r in results] == [w.qualified_name for w in writes]
    assert results[-1] == WriteResult(
        "Table", f"{SOURCE}/db/s/known", True, "00000000-0000-4000-8000-00000000000a"
    )
    assert results[1:3] == [results[1], results[2]] and len(results) == 4
    guids = [r.guid for r in results]
    assert guids[1:] == [guid_a, guid_b, "00000000-0000-4000-8000-00000000000a"]
    assert guids[0] not in (guid_a, guid_b) and len(guids[0]) == 36
    assert {e["attributes"]["qualifiedName"]: e["guid"] for e in catalog.dump(SOURCE)} == {
        w.qualified_name: guid for w, guid in zip(writes, guids, strict=True)
    }
    assert catalog.versions(SOURCE) == {
        ("Table", f"{SOURCE}/db/s/new"): 1,
        ("Table", f"{SOURCE}/db/s/a"): 2,
        ("Table", f"{SOURCE}/db/s/b"): 2,
        ("Table", f"{SOURCE}/db/s/known"): 1,
    }
    assert catalog.relationships(SOURCE) == {
        ("Table", f"{SOURCE}/db/s/new", "parent", "Schema", f"{SOURCE}/db/s"),
        ("Table", f"{SOURCE}/db/s/a", "parent", "Schema", f"{SOURCE}/db/s2"),
        ("Table", f"{SOURCE}/db/s/b", "parent", "Schema", f"{SOURCE}/db/s3"),
    }


def test_a_reference_listed_twice_is_one_edge(catalog):
    twice = (edge("Schema", "db/s"), edge("Schema", "db/s"), edge("Schema", "db/s", "other"))
    catalog.upsert([EntityWrite.of(entity("Table", "db/s/t"), "h", None, twice)])
    assert catalog.relationships(SOURCE) == {
        ("Table", f"{SOURCE}/db/s/t", "parent", "Schema", f"{SOURCE}/db/s"),
        ("Table", f"{SOURCE}/db/s/t", "other", "Schema", f"{SOURCE}/db/s"),
    }


def test_a_chunk_larger_than_one_statement(catalog):
    """Rows go in statements of ROWS_PER_STATEMENT, then of halving sizes: none is lost."""
    count = ROWS_PER_STATEMENT + 300
    writes = [
        EntityWrite.of(entity("Column", f"db/s/t/c{n}"), "h", None, (edge("Table", "db/s/t"),))
        for n in range(count)
    ]
    results = catalog.upsert(writes)
    assert len({r.guid for r in results}) == count
    assert len(catalog.versions(SOURCE)) == count
    assert len(catalog.relationships(SOURCE)) == count
    again = catalog.upsert(writes)
    assert [r.guid for r in again] == [r.guid for r in results]
    assert set(catalog.versions(SOURCE).values()) == {2}
    assert len(catalog.relationships(SOURCE)) == count


def test_new_guids_are_version_7_ascending_and_distinct():
    guids = new_guids(2000)
    assert guids == sorted(guids)
    assert len(set(guids)) == 2000
    for guid in guids:
        parsed = uuid.UUID(guid)
        assert str(parsed) == guid
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert new_guids(0) == []
    one = uuid.UUID(new_guid())
    assert one.version == 7 and str(one) > guids[-1][:13]  # later or same millisecond


def test_statement_parts_cover_every_row_in_few_shapes():
    for rows in (0, 1, 7, 500, ROWS_PER_STATEMENT, 3 * ROWS_PER_STATEMENT + 1):
        parts = list(_statement_parts(rows))
        assert [start for start, _ in parts] == [
            sum(size for _, size in parts[:n]) for n in range(len(parts))
        ]
        assert sum(size for _, size in parts) == rows
        assert all(size <= ROWS_PER_STATEMENT and size & (size - 1) == 0 for _, size in parts)


def test_a_write_that_does_not_name_its_connection_takes_the_entitys(catalog):
    named = write("Database", "db")
    e = entity("Schema", "db/s")
    unnamed = EntityWrite("Schema", e["attributes"]["qualifiedName"], orjson.dumps(e).decode(), "h")
    catalog.upsert([named, unnamed])
    assert {r["attributes"]["qualifiedName"] for r in catalog.dump(SOURCE)} == {
        f"{SOURCE}/db",
        f"{SOURCE}/db/s",
    }

    nowhere = {"typeName": "Table", "attributes": {"qualifiedName": "x/t"}}
    with pytest.raises(sa.exc.IntegrityError):
        catalog.upsert([EntityWrite("Table", "x/t", orjson.dumps(nowhere).decode(), "h")])


def test_a_sqlite_catalogs_writes_are_checkpointed_in_a_thread_that_close_stops(tmp_path):
    """Reading starts no thread; the first write starts one, each write wakes it, close ends it.
    Whatever it copied is in the database file, which reopens with everything written."""
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    catalog = SqlCatalog(url)
    assert list(catalog.dump()) == [] and catalog._checkpointer is None
    writes = [
        EntityWrite.of(entity("Column", f"db/s/t/c{n}", description="x" * 2000), "h")
        for n in range(2000)
    ]
    catalog.upsert(writes[:1000])
    checkpointer = catalog._checkpointer
    assert checkpointer is not None
    catalog.upsert(writes[1000:])
    catalog.delete([Identity("Column", writes[0].qualified_name)])
    deadline = time.monotonic() + 10
    while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpointer.checkpoints >= 1
    catalog.close()
    assert not checkpointer._thread.is_alive() and catalog._checkpointer is None

    again = SqlCatalog(url)
    try:
        assert len(again.versions(SOURCE)) == 2000 and len(list(again.dump(SOURCE))) == 1999
    finally:
        again.close()


def test_a_postgres_or_in_memory_catalog_has_no_checkpointer(make_postgres_database):
    for url in (make_postgres_database(), "sqlite://", "sqlite:///:memory:"):
        catalog = SqlCatalog(url)
        try:
            catalog.upsert([write("Database", "db")])
            assert catalog._checkpointer is None
        finally:
            catalog.close()
