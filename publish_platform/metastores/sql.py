"""The local catalog: an Atlas-like entity store in SQL (SQLite by default, Postgres by URL).

One table, one schema for both databases. Entities are keyed by guid and unique by identity;
deletes archive (status DELETED) unless purge is asked for. ``version`` counts the writes an
entity received, which is how tests and operators see that unchanged entities were not rewritten.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

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
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
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


class SqlCatalog:
    def __init__(self, url: str) -> None:
        self.engine = create_catalog_engine(url)
        with _transient_as_metastore_errors():
            metadata.create_all(self.engine, checkfirst=True)
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        # One statement, compiled once and run with many parameter sets (SQLAlchemy batches
        # them into multi-row INSERT … RETURNING): compiling a 500-row VALUES clause per chunk
        # cost more than the database's own work. Rows come back matched by identity, so their
        # order does not matter.
        statement = insert(entities)
        excluded = statement.excluded
        self._upsert = statement.on_conflict_do_update(
            index_elements=["type_name", "qualified_name"],
            set_={
                "connection_qualified_name": excluded.connection_qualified_name,
                "status": "ACTIVE",
                "entity": excluded.entity,
                "content_hash": excluded.content_hash,
                "version": entities.c.version + 1,
                "updated_at": excluded.updated_at,
            },
        ).returning(
            entities.c.guid,
            entities.c.type_name,
            entities.c.qualified_name,
        )

    def upsert(self, writes: Sequence[EntityWrite]) -> list[WriteResult]:
        if not writes:
            return []
        now = datetime.now(UTC)
        rows = [
            {
                "guid": write.guid or str(uuid.uuid4()),
                "type_name": write.type_name,
                "qualified_name": write.qualified_name,
                "connection_qualified_name": write.entity["attributes"]["connectionQualifiedName"],
                "status": "ACTIVE",
                "entity": orjson.dumps(write.entity).decode(),
                "content_hash": write.content_hash,
                "version": 1,
                "created_at": now,
                "updated_at": now,
            }
            for write in writes
        ]
        with _transient_as_metastore_errors(), self.engine.begin() as connection:
            returned = {
                (row.type_name, row.qualified_name): row.guid
                for row in connection.execute(self._upsert, rows)
            }
            guids = list(returned.values())
            connection.execute(sa.delete(relationships).where(relationships.c.from_guid.in_(guids)))
            edges = {
                (
                    returned[(w.type_name, w.qualified_name)],
                    ref["attribute"],
                    ref["type_name"],
                    ref["qualified_name"],
                )
                for w in writes
                for ref in w.references
            }
            if edges:
                connection.execute(
                    sa.insert(relationships),
                    [
                        {"from_guid": g, "attribute": a, "to_type_name": t, "to_qualified_name": q}
                        for g, a, t, q in sorted(edges)
                    ],
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
