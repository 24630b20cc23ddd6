"""The local catalog: an Atlas-like entity store in SQL (SQLite by default, Postgres by URL).

One table, one schema for both databases. Entities are keyed by guid and unique by identity;
deletes archive (status DELETED) unless purge is asked for. ``version`` counts the writes an
entity received, which is how tests and operators see that unchanged entities were not rewritten.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import orjson
import sqlalchemy as sa

from publish_platform.metastores.base import (
    EntityWrite,
    Identity,
    TransientMetastoreError,
    WriteResult,
)

metadata = sa.MetaData()

entities = sa.Table(
    "catalog_entities",
    metadata,
    sa.Column("guid", sa.String(36), primary_key=True),
    sa.Column("type_name", sa.String(255), nullable=False),
    sa.Column("qualified_name", sa.Text, nullable=False),
    sa.Column("connection_qualified_name", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("type_name", "qualified_name", name="uq_catalog_entities_identity"),
    sa.Index("ix_catalog_entities_connection", "connection_qualified_name", "status"),
)

# Reference edges of active entities, replaced whenever their entity is written.
relationships = sa.Table(
    "catalog_relationships",
    metadata,
    sa.Column("from_guid", sa.String(36), nullable=False),
    sa.Column("attribute", sa.String(255), nullable=False),
    sa.Column("to_type_name", sa.String(255), nullable=False),
    sa.Column("to_qualified_name", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint(
        "from_guid",
        "attribute",
        "to_type_name",
        "to_qualified_name",
        name="pk_catalog_relationships",
    ),
    sa.Index("ix_catalog_relationships_to", "to_type_name", "to_qualified_name"),
    sqlite_with_rowid=False,  # the key is the whole row: one B-tree instead of two
)

LOOKUP_BATCH = 500


def create_catalog_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            # Before anything is written: a new file takes this page size, an existing one keeps
            # its own. Entities are ~1 KB of JSON: with 4 KB pages writing a page (to the WAL, then
            # to the file) cost more in system calls than filling it.
            cursor.execute("PRAGMA page_size=16384")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA cache_size=-65536")  # 64 MiB: large publishes touch many pages
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


TRANSIENT_DB_ERRORS = (
    sa.exc.OperationalError,  # connection refused or lost, server restarting, database locked
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    sa.exc.TimeoutError,  # no connection from the pool in time
)


@contextmanager
def _transient_as_metastore_errors() -> Iterator[None]:
    """Database errors that say "not now" become TransientMetastoreError (retried, not split)."""
    try:
        yield
    except TRANSIENT_DB_ERRORS as exc:
        raise TransientMetastoreError(
            f"{type(exc.orig or exc).__name__}: {exc.orig or exc}"
        ) from exc


ROWS_PER_STATEMENT = 1000  # at most 6 parameters a row: within SQLite's and Postgres's limits

# Entities go to the database as the plan holds their JSON; rows come back with the guid each
# identity has (new or kept), matched by identity, so their order does not matter.
_UPSERT = (
    "WITH v (guid, type_name, qualified_name, connection, entity, content_hash)"
    " AS (VALUES {values})"
    " INSERT INTO catalog_entities (guid, type_name, qualified_name, connection_qualified_name,"
    " status, entity, content_hash, version, created_at, updated_at)"
    " SELECT v.guid, v.type_name, v.qualified_name,"
    " COALESCE(v.connection, {connection_of_entity}), 'ACTIVE', v.entity, v.content_hash, 1,"
    " {mark}, {mark} FROM v WHERE true"
    " ON CONFLICT (type_name, qualified_name) DO UPDATE SET"
    " connection_qualified_name = excluded.connection_qualified_name, status = 'ACTIVE',"
    " entity = excluded.entity, content_hash = excluded.content_hash,"
    " version = catalog_entities.version + 1, updated_at = excluded.updated_at"
    " RETURNING guid, type_name, qualified_name"
)
_INSERT_EDGES = (
    "INSERT INTO catalog_relationships (from_guid, attribute, to_type_name, to_qualified_name)"
    " VALUES {values}"
)

# Where each dialect finds an entity's connection in its JSON text when the write does not say
# (COALESCE evaluates it only then: reading it out of 1 KB of JSON costs more than the insert).
_CONNECTION_OF_ENTITY = {
    "sqlite": "json_extract(v.entity, '$.attributes.connectionQualifiedName')",
    "postgresql": "(v.entity::jsonb -> 'attributes' ->> 'connectionQualifiedName')",
}


_VERSION_VARIANT_MASK = ~((0xF << 76) | (0x3 << 62))
_VERSION_7_VARIANT_RFC = (0x7 << 76) | (0x2 << 62)


def new_guid() -> str:
    """A time-ordered UUID (version 7 layout). New entities append to the guid index instead of
    landing at random places in it: with random UUIDs the first publish of a large source
    spent half its time rewriting index pages."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & _VERSION_VARIANT_MASK | _VERSION_7_VARIANT_RFC
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class SqlCatalog:
    def __init__(self, url: str) -> None:
        self.engine = create_catalog_engine(url)
        with _transient_as_metastore_errors():
            metadata.create_all(self.engine, checkfirst=True)
        self._dialect = self.engine.dialect.name
        self._mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._statements: dict[tuple[str, int], str] = {}

    def _statement(self, template: str, width: int, rows: int) -> str:
        """``template`` with ``rows`` rows of ``width`` parameters in its VALUES, in the driver's
        parameter style; built once per shape, then reused."""
        key = (template, rows)
        if key not in self._statements:
            row = "(" + ",".join([self._mark] * width) + ")"
            self._statements[key] = template.format(
                values=",".join([row] * rows),
                mark=self._mark,
                connection_of_entity=_CONNECTION_OF_ENTITY[self._dialect],
            )
        return self._statements[key]

    def _now(self) -> datetime | str:
        """Now, as each driver takes it (SQLite: the text SQLAlchemy's DateTime reads back)."""
        now = datetime.now(UTC)
        if self._dialect == "sqlite":
            return now.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        return now

    def upsert(self, writes: Sequence[EntityWrite]) -> list[WriteResult]:
        if not writes:
            return []
        now = self._now()
        minted: set[str] = set()
        returned: dict[tuple[str, str], str] = {}
        with _transient_as_metastore_errors(), self.engine.begin() as connection:
            for start in range(0, len(writes), ROWS_PER_STATEMENT):
                part = writes[start : start + ROWS_PER_STATEMENT]
                params: list[object] = []
                for write in part:
                    guid = write.guid
                    if guid is None:
                        guid = new_guid()
                        minted.add(guid)
                    params += (
                        guid,
                        write.type_name,
                        write.qualified_name,
                        write.connection_qualified_name,
                        write.entity_json,
                        write.content_hash,
                    )
                params += (now, now)
                statement = self._statement(_UPSERT, 6, len(part))
                for guid, type_name, qualified_name in connection.exec_driver_sql(
                    statement, tuple(params)
                ):
                    returned[(type_name, qualified_name)] = guid
            # Edges of entities that existed before are replaced; a new guid has none yet.
            kept = [guid for guid in returned.values() if guid not in minted]
            for start in range(0, len(kept), LOOKUP_BATCH):
                connection.execute(
                    sa.delete(relationships).where(
                        relationships.c.from_guid.in_(kept[start : start + LOOKUP_BATCH])
                    )
                )
            edges = sorted(
                {
                    (
                        returned[(w.type_name, w.qualified_name)],
                        ref["attribute"],
                        ref["type_name"],
                        ref["qualified_name"],
                    )
                    for w in writes
                    for ref in w.references
                }
            )
            for start in range(0, len(edges), ROWS_PER_STATEMENT):
                part_edges = edges[start : start + ROWS_PER_STATEMENT]
                connection.exec_driver_sql(
                    self._statement(_INSERT_EDGES, 4, len(part_edges)),
                    tuple(value for edge in part_edges for value in edge),
                )
        return [
            WriteResult(
                w.type_name, w.qualified_name, True, returned[(w.type_name, w.qualified_name)]
            )
            for w in writes
        ]

    def delete(self, identities: Sequence[Identity], purge: bool = False) -> list[WriteResult]:
        if not identities:
            return []
        condition = sa.tuple_(entities.c.type_name, entities.c.qualified_name).in_(
            [(i.type_name, i.qualified_name) for i in identities]
        )
        with _transient_as_metastore_errors(), self.engine.begin() as connection:
            guids = {
                (row.type_name, row.qualified_name): row.guid
                for row in connection.execute(
                    sa.select(
                        entities.c.guid, entities.c.type_name, entities.c.qualified_name
                    ).where(condition)
                )
            }
            if purge:
                connection.execute(
                    sa.delete(relationships).where(relationships.c.from_guid.in_(guids.values()))
                )
                connection.execute(sa.delete(entities).where(condition))
            else:
                connection.execute(
                    sa.update(entities)
                    .where(condition & (entities.c.status == "ACTIVE"))
                    .values(
                        status="DELETED",
                        version=entities.c.version + 1,
                        updated_at=datetime.now(UTC),
                    )
                )
        return [
            WriteResult(
                i.type_name, i.qualified_name, True, guids.get((i.type_name, i.qualified_name))
            )
            for i in identities
        ]

    def existing(self, identities: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        with _transient_as_metastore_errors(), self.engine.connect() as connection:
            for start in range(0, len(identities), LOOKUP_BATCH):
                batch = list(identities[start : start + LOOKUP_BATCH])
                query = sa.select(entities.c.type_name, entities.c.qualified_name).where(
                    sa.tuple_(entities.c.type_name, entities.c.qualified_name).in_(batch)
                    & (entities.c.status == "ACTIVE")
                )
                found.update((r.type_name, r.qualified_name) for r in connection.execute(query))
        return found

    def relationships(self, source: str | None = None) -> set[tuple[str, str, str, str, str]]:
        """Edges of active entities: (from type, from qualifiedName, attribute, to type, to qn)."""
        query = sa.select(
            entities.c.type_name,
            entities.c.qualified_name,
            relationships.c.attribute,
            relationships.c.to_type_name,
            relationships.c.to_qualified_name,
        ).join(relationships, relationships.c.from_guid == entities.c.guid)
        query = query.where(entities.c.status == "ACTIVE")
        if source is not None:
            query = query.where(entities.c.connection_qualified_name == source)
        with self.engine.connect() as connection:
            return {tuple(row) for row in connection.execute(query)}

    def dump(self, source: str | None = None) -> Iterator[dict]:
        query = sa.select(entities.c.guid, entities.c.entity).where(entities.c.status == "ACTIVE")
        if source is not None:
            query = query.where(entities.c.connection_qualified_name == source)
        query = query.order_by(entities.c.type_name, entities.c.qualified_name)
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                yield {**orjson.loads(row.entity), "guid": row.guid}

    def versions(self, source: str | None = None) -> dict[tuple[str, str], int]:
        """How many writes each entity received (tests and operators: was it rewritten?)."""
        query = sa.select(entities.c.type_name, entities.c.qualified_name, entities.c.version)
        if source is not None:
            query = query.where(entities.c.connection_qualified_name == source)
        with self.engine.connect() as connection:
            return {(r.type_name, r.qualified_name): r.version for r in connection.execute(query)}

    def close(self) -> None:
        self.engine.dispose()
