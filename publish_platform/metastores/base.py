"""The contract every metastore implements: chunked upserts and deletes with per-entity results."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

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
class WriteResult:
    type_name: str
    qualified_name: str
    ok: bool
    guid: str | None = None
    error: str | None = None


class Metastore(Protocol):
    def upsert(self, entities: Sequence[EntityWrite]) -> list[WriteResult]:
        """Create or update a chunk. Raises if the chunk as a whole failed."""
        ...

    def delete(self, identities: Sequence[Identity], purge: bool = False) -> list[WriteResult]:
        """Archive (or purge) a chunk. Deleting what is already gone succeeds."""
        ...

    def existing(self, identities: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (typeName, qualifiedName) identities exist (active) in the metastore."""
        ...

    def dump(self, source: str | None = None) -> Iterator[dict]:
        """Active entities as the input carried them, plus their guid."""
        ...

    def close(self) -> None: ...
