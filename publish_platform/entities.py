"""Parse, validate, canonicalize and hash the entities of a batch.

Identity is (typeName, qualifiedName). The content hash is BLAKE2b-128 over the canonical JSON of
the entity without its volatile attributes: keys sorted at every depth, no whitespace, UTF-8
(orjson with OPT_SORT_KEYS). It depends on nothing but the entity, so it is stable across
processes, machines and library versions and can be persisted in snapshots.

Most lines of a batch are entities that did not change since the source's last snapshot. The raw
hash (``RawHasher``: the line's bytes without its volatile attributes) recognises those without
parsing them; only the lines it does not recognise are parsed, validated and hashed in full.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import orjson
import polars as pl
import pyarrow as pa

MAX_LINE_BYTES = 10 * 1024 * 1024
# Deepest nesting an entity may have: orjson serializes (canonical JSON, the content hash) no
# deeper than this, and parses no deeper than 1024. Deeper lines are isolated, never a crash.
MAX_DEPTH = 254

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
    "raw_hash": pl.String,
}

# Lines recognised by their raw hash as unchanged since the snapshot: not parsed.
UNCHANGED_SCHEMA = {"raw_hash": pl.String, "source_file": pl.String, "line": pl.Int64}


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


class RawHasher:
    """BLAKE2b-128 of a line's bytes with its volatile attributes cut out, keyed by the set of
    volatile attributes (a change of that setting can never match an older hash).

    Two lines with the same raw hash have the same content but for volatile values, so a line
    whose raw hash is in the snapshot is unchanged. The converse does not hold (key order or
    whitespace may differ): such lines are parsed and compared by content hash as usual. A line
    naming a volatile attribute more than once (a nested key of that name) gets no raw hash.
    """

    def __init__(self, volatile: Iterable[str]) -> None:
        names = sorted(set(volatile))
        self.limit = len(names)
        self.key = hashlib.blake2b(",".join(names).encode(), digest_size=16).digest()
        value = rb'(?:"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|null|true|false)'
        alternatives = b"|".join(re.escape(name.encode()) for name in names) or b"(?!)"
        self.pattern = re.compile(rb'"(?:' + alternatives + rb')"\s*:\s*' + value + rb"\s*,?")

    def __call__(self, line: bytes) -> str | None:
        blanked, cut = self.pattern.subn(b"", line)
        if cut > self.limit:
            return None
        return hashlib.blake2b(blanked, digest_size=16, key=self.key).hexdigest()


@dataclass
class ParsedEntities:
    frame: pl.DataFrame
    issues: list[EntityIssue]
    lines: int
    last_sync_ms: int | None = None  # newest lastSyncRunAt: when the source was read
    # Lines recognised as unchanged by their raw hash (UNCHANGED_SCHEMA), not parsed.
    unchanged: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=UNCHANGED_SCHEMA))


def numbered_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The lines of a file with their 1-based numbers, without a list of them all in memory."""
    start, number, size = 0, 0, len(data)
    while start < size:
        end = data.find(b"\n", start)
        if end == -1:
            end = size
        number += 1
        yield number, data[start:end]
        start = end + 1


def parse_files(
    files: Iterable[tuple[str, bytes]],
    volatile: Iterable[str],
    max_line_bytes: int = MAX_LINE_BYTES,
    known_raw: frozenset[str] | set[str] | None = None,
) -> ParsedEntities:
    """Parse JSON-lines files into one frame of valid entities; every bad line becomes an issue.

    Lines whose raw hash is in ``known_raw`` (the snapshot's) are unchanged: they are listed in
    ``unchanged`` and not parsed.
    """
    volatile_set = frozenset(volatile)
    raw_hash = RawHasher(volatile_set)
    rows: dict[str, list] = {name: [] for name in ENTITY_SCHEMA}
    unchanged: dict[str, list] = {name: [] for name in UNCHANGED_SCHEMA}
    issues: list[EntityIssue] = []
    total = 0
    last_sync_ms: int | None = None
    for source_file, data in files:
        for number, line in numbered_lines(data):
            if not line.strip():
                continue
            total += 1
            raw = raw_hash(line) if len(line) <= max_line_bytes else None
            if known_raw and raw in known_raw:
                unchanged["raw_hash"].append(raw)
                unchanged["source_file"].append(source_file)
                unchanged["line"].append(number)
                continue
            entity, issue = _parse_line(source_file, number, line, max_line_bytes)
            if issue is not None:
                issues.append(issue)
                continue
            assert entity is not None
            attributes = entity["attributes"]
            try:
                digest = content_hash(entity, volatile_set)
                canonical = canonical_json(entity).decode()
            except orjson.JSONEncodeError as exc:  # parsed, but nested deeper than MAX_DEPTH
                issues.append(_too_deep(source_file, number, exc, entity))
                continue
            synced = attributes.get("lastSyncRunAt")
            if isinstance(synced, int) and (last_sync_ms is None or synced > last_sync_ms):
                last_sync_ms = synced
            rows["type_name"].append(entity["typeName"])
            rows["qualified_name"].append(attributes["qualifiedName"])
            rows["connection_qualified_name"].append(attributes["connectionQualifiedName"])
            rows["hash"].append(digest)
            rows["entity"].append(canonical)
            rows["references"].append(references_of(attributes))
            rows["source_file"].append(source_file)
            rows["line"].append(number)
            rows["raw_hash"].append(raw)
    # Lists of structs built by Arrow in one call (polars would build a frame per row).
    references = pl.from_arrow(pa.array(rows.pop("references"), type=ARROW_REFERENCES))
    frame = pl.DataFrame(rows, schema={k: v for k, v in ENTITY_SCHEMA.items() if k in rows})
    frame = frame.with_columns(references.alias("references")).select(list(ENTITY_SCHEMA))
    return ParsedEntities(
        frame=frame,
        issues=issues,
        lines=total,
        last_sync_ms=last_sync_ms,
        unchanged=pl.DataFrame(unchanged, schema=UNCHANGED_SCHEMA),
    )


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
        if "depth limit" in str(exc):
            return None, _too_deep(source_file, number, exc)
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


def _too_deep(
    source_file: str, number: int, exc: Exception, entity: dict | None = None
) -> EntityIssue:
    """A line nested deeper than MAX_DEPTH (with its identity once parsed)."""
    return EntityIssue(
        source_file,
        number,
        "too_deeply_nested",
        f"JSON nested deeper than {MAX_DEPTH} levels ({exc})",
        entity["typeName"] if entity else None,
        entity["attributes"]["qualifiedName"] if entity else None,
    )
