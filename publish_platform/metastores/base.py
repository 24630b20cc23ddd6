"""The contract every metastore implements: chunked upserts and deletes with per-entity results."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, overload

import orjson


class TransientMetastoreError(RuntimeError):
    """The metastore could not answer now (connection reset, timeout, 5xx): retry, don't split."""


class ThrottledError(TransientMetastoreError):
    """The metastore asks us to slow down (HTTP 429), possibly saying for how long."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MetastoreRefusedError(RuntimeError):
    """The metastore refuses every request (bad credentials, no permission): no chunk is at
    fault, so the step fails whole (retried by tier 2, then dead-lettered) instead of splitting."""


@dataclass(frozen=True)
class Identity:
    type_name: str
    qualified_name: str
    guid: str | None = None  # the metastore's id when the snapshot has it (saves a look-up)


@dataclass(frozen=True)
class EntityWrite:
    """One entity to create or update, exactly as the input carried it.

    The entity travels as the plan's JSON text: a metastore that stores text (the SQL catalog)
    never pays for parsing and re-serialising it; one that needs the object parses it once.
    """

    type_name: str
    qualified_name: str
    entity_json: str
    content_hash: str
    guid: str | None = None
    # Reference edges: {"attribute", "type_name", "qualified_name"} of each target.
    references: tuple[dict[str, str], ...] = ()
    # The entity's connectionQualifiedName when the caller knows it (a batch's entities all
    # belong to its source); a metastore reads it from the entity otherwise.
    connection_qualified_name: str | None = None

    @classmethod
    def of(
        cls,
        entity: dict,
        content_hash: str,
        guid: str | None = None,
        references: tuple[dict[str, str], ...] = (),
    ) -> EntityWrite:
        return cls(
            entity["typeName"],
            entity["attributes"]["qualifiedName"],
            orjson.dumps(entity).decode(),
            content_hash,
            guid,
            references,
            entity["attributes"]["connectionQualifiedName"],
        )

    @cached_property
    def entity(self) -> dict:
        return orjson.loads(self.entity_json)


@dataclass(frozen=True)
class WriteColumns:
    """A chunk of writes as columns, one list per field: what a database metastore binds, without
    an object (and a dict per reference) made for every entity of a large publish."""

    type_names: list[str]
    qualified_names: list[str]
    entity_jsons: list[str]
    content_hashes: list[str]
    guids: list[str | None]
    connection_qualified_names: list[str | None]
    # One edge per reference: the position of the entity in the chunk, then its target.
    edge_rows: list[int]
    edge_attributes: list[str]
    edge_type_names: list[str]
    edge_qualified_names: list[str]

    @classmethod
    def of(cls, writes: Sequence[EntityWrite]) -> WriteColumns:
        """The columns of any chunk: those an EntityWrites holds, or made from the objects."""
        if isinstance(writes, EntityWrites):
            return writes.columns
        edges = [
            (row, ref["attribute"], ref["type_name"], ref["qualified_name"])
            for row, write in enumerate(writes)
            for ref in write.references
        ]
        edge_rows, attributes, type_names, qualified_names = (
            [list(column) for column in zip(*edges, strict=True)] if edges else ([], [], [], [])
        )
        return cls(
            [w.type_name for w in writes],
            [w.qualified_name for w in writes],
            [w.entity_json for w in writes],
            [w.content_hash for w in writes],
            [w.guid for w in writes],
            [w.connection_qualified_name for w in writes],
            edge_rows,
            attributes,
            type_names,
            qualified_names,
        )


class EntityWrites(Sequence[EntityWrite]):
    """A chunk of writes kept as columns (as the plan holds them). A metastore that binds
    columns reads ``columns``; one that works entity by entity gets EntityWrite objects, made
    as it reads them."""

    def __init__(self, columns: WriteColumns) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns.type_names)

    @overload
    def __getitem__(self, index: int) -> EntityWrite: ...

    @overload
    def __getitem__(self, index: slice) -> list[EntityWrite]: ...

    def __getitem__(self, index: int | slice) -> EntityWrite | list[EntityWrite]:
        if isinstance(index, slice):
            return [self[row] for row in range(*index.indices(len(self)))]
        c = self.columns
        return EntityWrite(
            c.type_names[index],
            c.qualified_names[index],
            c.entity_jsons[index],
            c.content_hashes[index],
            c.guids[index],
            self._references[index],
            c.connection_qualified_names[index],
        )

    @cached_property
    def _references(self) -> list[tuple[dict[str, str], ...]]:
        """Each entity's references as EntityWrite carries them, regrouped from the edges."""
        grouped: list[list[dict[str, str]]] = [[] for _ in range(len(self))]
        c = self.columns
        for row, attribute, type_name, qualified_name in zip(
            c.edge_rows, c.edge_attributes, c.edge_type_names, c.edge_qualified_names, strict=True
        ):
            grouped[row].append(
                {"attribute": attribute, "type_name": type_name, "qualified_name": qualified_name}
            )
        return [tuple(refs) for refs in grouped]


@dataclass(frozen=True)
class WriteResult:
    type_name: str
    qualified_name: str
    ok: bool
    guid: str | None = None
    error: str | None = None


class WriteResults(Sequence[WriteResult]):
    """The results of a chunk whose every write succeeded, kept as columns: a WriteResult is
    made only for a reader that asks for one (the publish reads the guids)."""

    def __init__(self, type_names: list[str], qualified_names: list[str], guids: list[str]) -> None:
        self.type_names = type_names
        self.qualified_names = qualified_names
        self.guids = guids

    def __len__(self) -> int:
        return len(self.guids)

    @overload
    def __getitem__(self, index: int) -> WriteResult: ...

    @overload
    def __getitem__(self, index: slice) -> list[WriteResult]: ...

    def __getitem__(self, index: int | slice) -> WriteResult | list[WriteResult]:
        if isinstance(index, slice):
            return [self[row] for row in range(*index.indices(len(self)))]
        return WriteResult(
            self.type_names[index], self.qualified_names[index], True, self.guids[index]
        )


class Metastore(Protocol):
    def upsert(self, entities: Sequence[EntityWrite]) -> Sequence[WriteResult]:
        """Create or update a chunk. Raises if the chunk as a whole failed."""
        ...

    def delete(self, identities: Sequence[Identity], purge: bool = False) -> Sequence[WriteResult]:
        """Archive (or purge) a chunk. Deleting what is already gone succeeds."""
        ...

    def existing(self, identities: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (typeName, qualifiedName) identities exist (active) in the metastore."""
        ...

    def dump(self, source: str | None = None) -> Iterator[dict]:
        """Active entities as the input carried them, plus their guid."""
        ...

    def close(self) -> None: ...
