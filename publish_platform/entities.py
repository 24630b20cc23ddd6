"""Parse, validate, canonicalize and hash the entities of a batch.

Identity is (typeName, qualifiedName). The content hash is BLAKE2b-128 over the canonical JSON of
the entity without its volatile attributes: keys sorted at every depth, no whitespace, UTF-8
(orjson with OPT_SORT_KEYS). It depends on nothing but the entity, so it is stable across
processes, machines and library versions and can be persisted in snapshots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import polars as pl
import pyarrow as pa

MAX_LINE_BYTES = 10 * 1024 * 1024

# Reference attributes of an entity: which attribute points at which (typeName, qualifiedName).
REFERENCES = pl.List(
    pl.Struct({"attribute": pl.String, "type_name": pl.String, "qualified_name": pl.String})
)

ARROW_REFERENCES = pa.list_(
    pa.struct(
        [("attribute", pa.string()), ("type_name", pa.string()), ("qualified_name", pa.string())]
    )
)

ENTITY_SCHEMA = {
    "type_name": pl.String,
    "qualified_name": pl.String,
    "connection_qualified_name": pl.String,
    "hash": pl.String,
    "entity": pl.String,
    "references": REFERENCES,
    "source_file": pl.String,
    "line": pl.Int64,
}


@dataclass(frozen=True)
class EntityIssue:
    """One line or entity that cannot be published, with where it came from and why."""

    source_file: str
    line: int
    reason: str
    message: str
    type_name: str | None = None
    qualified_name: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "source_file": self.source_file,
            "line": self.line,
            "reason": self.reason,
            "message": self.message,
            "type_name": self.type_name,
            "qualified_name": self.qualified_name,
        }


def canonical_json(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def content_hash(entity: dict, volatile: frozenset[str]) -> str:
    """Hash of what matters in an entity: everything but its volatile attributes."""
    attributes = entity.get("attributes")
    if isinstance(attributes, dict) and volatile.intersection(attributes):
        entity = {
            **entity,
            "attributes": {k: v for k, v in attributes.items() if k not in volatile},
        }
    return hashlib.blake2b(canonical_json(entity), digest_size=16).hexdigest()


def references_of(attributes: dict) -> list[dict[str, str]]:
    """Attributes that reference entities: ``{"typeName", "uniqueAttributes"}`` or lists of them."""
    refs: list[dict[str, str]] = []
    for name, value in attributes.items():
        # Most attributes are scalars: skip them before looking closer (this runs per entity).
        if value.__class__ is dict:
            items: Iterable[object] = (value,)
        elif value.__class__ is list:
            items = value
        else:
            continue
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("typeName"), str):
                unique = item.get("uniqueAttributes")
                if isinstance(unique, dict) and isinstance(unique.get("qualifiedName"), str):
                    refs.append(
                        {
                            "attribute": name,
                            "type_name": item["typeName"],
                            "qualified_name": unique["qualifiedName"],
                        }
                    )
    return refs


@dataclass
class ParsedEntities:
    frame: pl.DataFrame
    issues: list[EntityIssue]
    lines: int
    last_sync_ms: int | None = None  # newest lastSyncRunAt: when the source was read


def parse_files(
    files: Iterable[tuple[str, bytes]],
    volatile: Iterable[str],
    max_line_bytes: int = MAX_LINE_BYTES,
) -> ParsedEntities:
    """Parse JSON-lines files into one frame of valid entities; every bad line becomes an issue."""
    volatile_set = frozenset(volatile)
    rows: dict[str, list] = {name: [] for name in ENTITY_SCHEMA}
    issues: list[EntityIssue] = []
    total = 0
    last_sync_ms: int | None = None
    for source_file, data in files:
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            total += 1
            entity, issue = _parse_line(source_file, number, line, max_line_bytes)
            if issue is not None:
                issues.append(issue)
                continue
            assert entity is not None
            attributes = entity["attributes"]
            synced = attributes.get("lastSyncRunAt")
            if isinstance(synced, int) and (last_sync_ms is None or synced > last_sync_ms):
                last_sync_ms = synced
            rows["type_name"].append(entity["typeName"])
            rows["qualified_name"].append(attributes["qualifiedName"])
            rows["connection_qualified_name"].append(attributes["connectionQualifiedName"])
            rows["hash"].append(content_hash(entity, volatile_set))
            rows["entity"].append(canonical_json(entity).decode())
            rows["references"].append(references_of(attributes))
            rows["source_file"].append(source_file)
            rows["line"].append(number)
    # Lists of structs built by Arrow in one call (polars would build a frame per row).
    references = pl.from_arrow(pa.array(rows.pop("references"), type=ARROW_REFERENCES))
    frame = pl.DataFrame(rows, schema={k: v for k, v in ENTITY_SCHEMA.items() if k in rows})
    frame = frame.with_columns(references.alias("references")).select(list(ENTITY_SCHEMA))
    return ParsedEntities(frame=frame, issues=issues, lines=total, last_sync_ms=last_sync_ms)


def _parse_line(
    source_file: str, number: int, line: bytes, max_line_bytes: int
) -> tuple[dict | None, EntityIssue | None]:
    def issue(reason: str, message: str, entity: dict | None = None) -> tuple[None, EntityIssue]:
        type_name = qualified_name = None
        if entity is not None:
            type_name = entity.get("typeName") if isinstance(entity.get("typeName"), str) else None
            attrs = entity.get("attributes")
            if isinstance(attrs, dict) and isinstance(attrs.get("qualifiedName"), str):
                qualified_name = attrs["qualifiedName"]
        return None, EntityIssue(source_file, number, reason, message, type_name, qualified_name)

    if len(line) > max_line_bytes:
        return issue("line_too_large", f"line of {len(line)} bytes exceeds {max_line_bytes}")
    try:
        entity = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return issue("malformed_json", f"not valid JSON (or not UTF-8): {exc}")
    if not isinstance(entity, dict):
        return issue("malformed_json", f"expected a JSON object, got {type(entity).__name__}")
    type_name = entity.get("typeName")
    if not isinstance(type_name, str) or not type_name:
        return issue("missing_type_name", "entity has no typeName", entity)
    attributes = entity.get("attributes")
    if not isinstance(attributes, dict):
        return issue("missing_attributes", "entity has no attributes object", entity)
    qualified_name = attributes.get("qualifiedName")
    if not isinstance(qualified_name, str) or not qualified_name:
        return issue("missing_qualified_name", "entity has no attributes.qualifiedName", entity)
    connection = attributes.get("connectionQualifiedName")
    if not isinstance(connection, str) or not connection:
        return issue(
            "missing_connection", "entity has no attributes.connectionQualifiedName", entity
        )
    return entity, None
