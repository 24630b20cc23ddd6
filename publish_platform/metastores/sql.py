"""The local catalog: an Atlas-like entity store in SQL (SQLite by default, Postgres by URL).

One table, one schema for both databases. Entities are keyed by guid and unique by identity;
deletes archive (status DELETED) unless purge is asked for. ``version`` counts the writes an
entity received, which is how tests and operators see that unchanged entities were not rewritten.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any, cast

import orjson
import sqlalchemy as sa

from publish_platform.metastores.base import (
    EntityWrite,
    Identity,
    TransientMetastoreError,
    WriteColumns,
    WriteResult,
    WriteResults,
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
            # its own. Entities are ~1 KB of JSON: 16 KiB pages take a publish's rows to the WAL
            # and into the file in far fewer writes than 4 KiB ones (system calls were a third of
            # a large publish).
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


# Rows of one statement: at most 6 parameters a row, within SQLite's and Postgres's limits.
# Statements come in power-of-two sizes up to this, so that a handful of shapes, each prepared
# once per connection, serve every chunk (preparing a 500-row statement costs SQLite ~2 ms).
ROWS_PER_STATEMENT = 512

# Entities go to the database as the plan holds their JSON. The statement starts with INSERT:
# Python's sqlite3 opens the chunk's transaction before a statement only if it starts with
# INSERT, UPDATE, DELETE or REPLACE (a ``WITH`` in front once made each upsert commit alone).
# On SQLite, OR FAIL: a failing statement leaves its earlier rows for the rollback of the whole
# chunk to undo, so SQLite keeps no statement journal (a copy of every page each statement
# touches). For the same reason the statements call no function (json_extract may fail).
_INSERT_ENTITIES = (
    "INSERT{or_fail} INTO catalog_entities (guid, type_name, qualified_name,"
    " connection_qualified_name, status, entity, content_hash, version, created_at, updated_at)"
    " SELECT v.column1, v.column2, v.column3, v.column4, 'ACTIVE', v.column5, v.column6, 1,"
    " {mark}, {mark} FROM (VALUES {values}) AS v WHERE true"
)
# Entities the caller has no guid for are new but for the rare publish that lost track of what it
# wrote: inserted with the guids minted for them, they need nothing back from the database.
_INSERT_NEW = _INSERT_ENTITIES + " ON CONFLICT (type_name, qualified_name) DO NOTHING"
# The others (and new ones the catalog had after all) come back with the guid each identity has,
# new or kept, matched by identity, so their order does not matter.
_UPSERT = (
    _INSERT_ENTITIES + " ON CONFLICT (type_name, qualified_name) DO UPDATE SET"
    " connection_qualified_name = excluded.connection_qualified_name, status = 'ACTIVE',"
    " entity = excluded.entity, content_hash = excluded.content_hash,"
    " version = catalog_entities.version + 1, updated_at = excluded.updated_at"
    " RETURNING guid, type_name, qualified_name"
)
# Duplicate references of one entity are one edge.
_INSERT_EDGES = (
    "INSERT{or_fail} INTO catalog_relationships"
    " (from_guid, attribute, to_type_name, to_qualified_name)"
    " VALUES {values} ON CONFLICT DO NOTHING"
)
_OR_FAIL = {"sqlite": " OR FAIL", "postgresql": ""}


def _connection_of(entity_json: str) -> str | None:
    """The entity's connection, for a write that does not say (publish passes its batch's)."""
    return (orjson.loads(entity_json).get("attributes") or {}).get("connectionQualifiedName")


def _interleaved(*columns: list[Any]) -> list[Any]:
    """The columns' values row by row, as one flat list of statement parameters."""
    return list(chain.from_iterable(zip(*columns, strict=True)))


def _statement_parts(rows: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the statements ``rows`` rows go in: full ones, then the binary digits of
    the rest, largest first."""
    start = 0
    size = ROWS_PER_STATEMENT
    while start < rows:
        while size > rows - start:
            size //= 2
        yield start, size
        start += size


_VARIANT = {digit: "89ab"[int(digit, 16) % 4] for digit in "0123456789abcdef"}


def new_guids(count: int) -> list[str]:
    """``count`` time-ordered UUIDs (version 7 layout), ascending. New entities append to the guid
    index instead of landing at random places in it: with random UUIDs the first publish of a
    large source spent half its time rewriting index pages. The randomness of a whole chunk is
    one call to the OS (one per entity was a tenth of the publish)."""
    stamp = f"{time.time_ns() // 1_000_000:012x}"
    head = f"{stamp[:8]}-{stamp[8:]}-7"
    x = os.urandom(10 * count).hex()  # 20 hex digits each, 19 used: 74 random bits
    guids = [
        f"{head}{x[i : i + 3]}-{_VARIANT[x[i + 3]]}{x[i + 4 : i + 7]}-{x[i + 7 : i + 19]}"
        for i in range(0, 20 * count, 20)
    ]
    guids.sort()
    return guids


def new_guid() -> str:
    """One time-ordered UUID, as new_guids makes them (for callers minting one at a time)."""
    return new_guids(1)[0]


class _Checkpointer:
    """Copies the pages commits append to a SQLite catalog's WAL into its database file, in a
    thread of its own with a connection of its own.

    SQLite does that itself inside the commit that takes the WAL past 1000 pages, which then also
    copies 16 MB and waits for two fsyncs: a fifth of a large publish. Woken after every write,
    this copies while the next chunk is prepared and written (PASSIVE: it neither blocks a writer
    nor waits for one). SQLite's own checkpoint stays as the backstop, and finds little left to
    copy. Durability is as before: the WAL is synced before each checkpoint, here sooner.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.checkpoints = 0  # completed by the thread (tests, operators)
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="catalog-checkpoint", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error:
            return  # SQLite's own checkpoint does the work
        try:
            while self._wake.wait() and not self._closing:
                self._wake.clear()
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    continue  # e.g. another process is checkpointing: the next wake retries
                self.checkpoints += 1
        finally:
            connection.close()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()


def _sqlite_file(url: sa.URL) -> str | None:
    """The database file of a SQLite URL; None for Postgres, memory, or a URI with options."""
    if url.get_backend_name() != "sqlite" or url.query:
        return None
    return url.database if url.database not in (None, "", ":memory:") else None


class SqlCatalog:
    def __init__(self, url: str) -> None:
        self.engine = create_catalog_engine(url)
        with _transient_as_metastore_errors():
            metadata.create_all(self.engine, checkfirst=True)
        self._dialect = self.engine.dialect.name
        self._mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._statements: dict[tuple[str, int], str] = {}
        # Started by the first write: a catalog opened to read starts no thread.
        self._checkpointer: _Checkpointer | None = None
        self._file = _sqlite_file(self.engine.url)

    def _written(self) -> None:
        """After a write committed: wake the checkpointer (SQLite files only)."""
        if self._file is None:
            return
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self._file)
        self._checkpointer.wake()

    def _statement(self, template: str, width: int, rows: int) -> str:
        """``template`` with ``rows`` rows of ``width`` parameters in its VALUES, in the driver's
        parameter style; built once per shape, then reused."""
        key = (template, rows)
        if key not in self._statements:
            row = "(" + ",".join([self._mark] * width) + ")"
            self._statements[key] = template.format(
                values=",".join([row] * rows),
                mark=self._mark,
                or_fail=_OR_FAIL[self._dialect],
            )
        return self._statements[key]

    def _now(self) -> datetime | str:
        """Now, as each driver takes it (SQLite: the text SQLAlchemy's DateTime reads back)."""
        now = datetime.now(UTC)
        if self._dialect == "sqlite":
            return now.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        return now

    def upsert(self, writes: Sequence[EntityWrite]) -> Sequence[WriteResult]:
        if not writes:
            return []
        columns = WriteColumns.of(writes)
        guids = list(columns.guids)
        fresh = [row for row, guid in enumerate(guids) if guid is None]
        for row, guid in zip(fresh, new_guids(len(fresh)), strict=True):
            guids[row] = guid
        now = self._now()
        with _transient_as_metastore_errors(), self.engine.begin() as connection:
            rest = [row for row, guid in enumerate(columns.guids) if guid is not None]
            rest += self._insert_new(connection, columns, guids, fresh, now)
            # Edges of entities that existed before are replaced; a new guid has none yet.
            kept = self._upsert(connection, columns, guids, sorted(rest), now)
            for start in range(0, len(kept), LOOKUP_BATCH):
                connection.execute(
                    sa.delete(relationships).where(
                        relationships.c.from_guid.in_(kept[start : start + LOOKUP_BATCH])
                    )
                )
            edges = _interleaved(
                [guids[row] for row in columns.edge_rows],
                columns.edge_attributes,
                columns.edge_type_names,
                columns.edge_qualified_names,
            )
            for start, size in _statement_parts(len(columns.edge_rows)):
                connection.exec_driver_sql(
                    self._statement(_INSERT_EDGES, 4, size),
                    tuple(edges[4 * start : 4 * (start + size)]),
                )
        self._written()
        # Every guid is known now: minted, given, or the one the catalog had.
        return WriteResults(columns.type_names, columns.qualified_names, cast(list[str], guids))

    def _entity_params(
        self, columns: WriteColumns, guids: list[str | None], rows: list[int], now: object
    ) -> Iterator[tuple[int, tuple[object, ...]]]:
        """(rows, parameters) of each statement writing ``rows``: now twice, then 6 a row."""
        connections = columns.connection_qualified_names
        if None in connections:
            connections = [
                connection if connection is not None else _connection_of(entity)
                for connection, entity in zip(connections, columns.entity_jsons, strict=True)
            ]
        # ``rows`` ascend: as many as the chunk has are all of them, in order.
        picked = [
            column if len(rows) == len(column) else [column[row] for row in rows]
            for column in (
                guids,
                columns.type_names,
                columns.qualified_names,
                connections,
                columns.entity_jsons,
                columns.content_hashes,
            )
        ]
        values = _interleaved(*picked)
        for start, size in _statement_parts(len(rows)):
            yield size, (now, now, *values[6 * start : 6 * (start + size)])

    def _insert_new(
        self,
        connection: sa.Connection,
        columns: WriteColumns,
        guids: list[str | None],
        fresh: list[int],
        now: object,
    ) -> list[int]:
        """Insert the ``fresh`` rows with their minted guids; return those the catalog had."""
        inserted = 0
        for size, params in self._entity_params(columns, guids, fresh, now):
            result = connection.exec_driver_sql(self._statement(_INSERT_NEW, 6, size), params)
            inserted += result.rowcount
        if inserted == len(fresh):
            return []
        stored: set[str] = set()
        minted = [guids[row] for row in fresh]
        for start in range(0, len(minted), LOOKUP_BATCH):
            query = sa.select(entities.c.guid).where(
                entities.c.guid.in_(minted[start : start + LOOKUP_BATCH])
            )
            stored.update(connection.execute(query).scalars())
        return [row for row in fresh if guids[row] not in stored]

    def _upsert(
        self,
        connection: sa.Connection,
        columns: WriteColumns,
        guids: list[str | None],
        rows: list[int],
        now: object,
    ) -> list[str]:
        """Insert or update ``rows``; set the guid each has in ``guids``; return the guids of
        those that existed before."""
        returned: dict[tuple[str, str], str] = {}
        for size, params in self._entity_params(columns, guids, rows, now):
            statement = self._statement(_UPSERT, 6, size)
            for guid, type_name, qualified_name in connection.exec_driver_sql(statement, params):
                returned[(type_name, qualified_name)] = guid
        kept = []
        for row in rows:
            guid = returned[(columns.type_names[row], columns.qualified_names[row])]
            if guid != guids[row] or columns.guids[row] is not None:
                kept.append(guid)
            guids[row] = guid
        return kept

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
        self._written()
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
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        self.engine.dispose()
