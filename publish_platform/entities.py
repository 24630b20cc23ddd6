"""Parse, validate, canonicalize and hash the entities of a batch.

Identity is (typeName, qualifiedName). The content hash is BLAKE2b-128 over the canonical JSON of
the entity without its volatile attributes: keys sorted at every depth, no whitespace, UTF-8
(orjson with OPT_SORT_KEYS). It depends on nothing but the entity, so it is stable across
processes, machines and library versions and can be persisted in snapshots.

Most lines of a batch are entities that did not change since the source's last snapshot. The raw
hash (``RawHasher``: the line's bytes without its volatile attributes) recognises those without
parsing them; only the lines it does not recognise are parsed, validated and hashed in full.

The entity JSON of those lines, their references and hashes are most of what a large batch weighs
(a source's first batch is all of it): given a spill folder, the parse writes them there a block
at a time and the frame keeps only where each entity's are (``entity_row``). ``with_entities``
reads them back in a stream.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

MAX_LINE_BYTES = 10 * 1024 * 1024
T = TypeVar("T")
# Whole lines, in one buffer or a few consecutive ones (see line_blocks).
Block = list[bytes | memoryview]
# Deepest nesting an entity may have: orjson serializes (canonical JSON, the content hash) no
# deeper than this, and parses no deeper than 1024. Deeper lines are isolated, never a crash.
MAX_DEPTH = 254

# Types this platform knows how to order and publish (Atlas SQL asset model), parents first.
TYPE_RANK: dict[str, int] = {
    "Connection": 0,
    "Database": 1,
    "Schema": 2,
    "Table": 3,
    "View": 3,
    "MaterialisedView": 3,
    "Procedure": 3,
    "Function": 3,
    "SnowflakeDynamicTable": 3,
    "TablePartition": 4,
    "Column": 5,
}


_RANKS = pl.Series("rank", list(TYPE_RANK.values()), dtype=pl.UInt8)


def type_rank() -> pl.Expr:
    """Where an entity's type comes among a plan's creates and updates: parents first, a type
    this platform does not publish last (the diff isolates it).

    Each type's place among the known ones (an enum's), then its rank from that: a
    ``replace_strict`` of the names took 43 bytes a row (215 MB of a 5M first batch's steps,
    which check that their changes are in plan order), this takes 1 or 2."""
    known = pl.col("type_name").cast(pl.Enum(list(TYPE_RANK)), strict=False).to_physical()
    return pl.lit(_RANKS).gather(known).fill_null(len(TYPE_RANK))


# What every entity must have to be published (plan rule): checked when its line is parsed.
REQUIRED_ATTRIBUTES = ("qualifiedName", "name", "connectionQualifiedName")

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
    # One value (or a few) a batch: categorical, 4 bytes a row where a string took 16 or more.
    "connection_qualified_name": pl.Categorical,
    "hash": pl.String,
    "entity": pl.String,
    "references": REFERENCES,
    "source_file": pl.Categorical,
    "line": pl.Int64,
    "raw_hash": pl.UInt128,
    # The required attributes the entity lacks ("" when none; null when not checked yet).
    "missing": pl.String,
    # Where the entity's JSON, references and hashes are in the spill (``with_entities``): null
    # when the frame holds them.
    "entity_row": pl.UInt32,
}

# What a row with an ``entity_row`` may have in the spill or a stored diff, and not in its
# frame: ``with_entities`` fills those its source has (a parse's spill has no guid: a guid is
# the snapshot's, set by the diff).
FILLED = ["entity", "references", "hash", "raw_hash", "guid"]
# What of a row a parse's spill holds, and its frame does not: the JSON, references and hashes.
WAITING = ["entity", "references", "hash", "raw_hash"]
# A parse's spill: those, and the identity its references are read with (``plan._references``).
SPILLED = ["type_name", "qualified_name", *WAITING]

# Lines recognised by their raw hash as unchanged since the snapshot (the row they match in it):
# not parsed. (The raw hash is the row's.) Most lines of a batch are these: 12 bytes each.
UNCHANGED_SCHEMA = {
    "snapshot_row": pl.UInt32,
    "source_file": pl.Categorical,
    "line": pl.UInt32,
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


def missing_required(entity: object) -> str:
    """The required attributes a parsed entity lacks, comma-separated ("" when none)."""
    attributes = entity.get("attributes") if isinstance(entity, dict) else None
    if not isinstance(attributes, dict):
        return ", ".join(REQUIRED_ATTRIBUTES)
    return ", ".join(n for n in REQUIRED_ATTRIBUTES if attributes.get(n) in (None, ""))


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


# Bumped whenever what a raw hash covers changes: hashes of another scheme then never match (the
# lines of a source's next batch are parsed once, and its snapshot has hashes of this scheme).
# 2: a volatile pair replaced by CUT_MARK in place, and kept only for lines whose cuts were all
# volatile attributes (1 cut pairs and a comma after them anywhere, nested keys too).
RAW_HASH_SCHEME = 2
# What a cut pair leaves: a byte that no line of valid JSON has unescaped.
CUT_MARK = "\x00"


def volatile_only_cut(attributes: dict, volatile: frozenset[str], volatile_names: int) -> bool:
    """Whether the raw hash's cuts in a parsed line (it had ``volatile_names`` keys of a volatile
    name, at any depth) can only have been its volatile attributes: it has as many of those as
    keys of their names. Otherwise a line that differs from it in the value of a nested key of
    a volatile name (which its content hash covers) would get its raw hash: it is not kept."""
    return volatile_names == sum(name in attributes for name in volatile)


# Lines are scanned this many bytes at a time: memory stays flat. (Each block costs polars a
# query of its own: at 8 MiB that overhead made the pass a quarter slower.)
BLOCK_BYTES = 16 * 1024 * 1024


class RawHasher:
    """Raw hashes of lines: a line's bytes with each pair of a volatile name and its scalar value
    replaced by a mark, in place, hashed twice (128 bits) with seeds derived from the set of
    volatile attributes and RAW_HASH_SCHEME, so a change of either can never match an older
    hash.

    The regex cannot tell an attribute from a nested key of the same name, so a raw hash is only
    kept for a line whose cuts were all its volatile attributes (``volatile_only_cut``, checked
    when the line is parsed): then a line with the same raw hash has the same text but for
    volatile attributes' values in the same places, hence the same content, and a line whose raw
    hash is in the snapshot is unchanged. The converse does not hold (key order or whitespace
    may differ): such lines are parsed and compared by content hash as usual.

    The work runs in polars (Rust regex and hash, all cores), a block of lines at a time: it is
    what every line of a batch pays, so it must cost less than parsing the line. polars does not
    promise the same hash across its versions: after an upgrade lines are only not recognised
    (parsed, at the usual cost), never wrongly recognised.
    """

    def __init__(self, volatile: Iterable[str]) -> None:
        names = sorted(set(volatile))
        key = hashlib.blake2b(
            f"{RAW_HASH_SCHEME}:{','.join(names)}".encode(), digest_size=16
        ).digest()
        self.seeds = (int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big"))
        alternatives = "|".join(re.escape(name) for name in names)
        value = r'(?:"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|null|true|false)'
        self.names_pattern = rf'"(?:{alternatives})"\s*:' if names else None
        self.names_regex = re.compile(self.names_pattern.encode()) if self.names_pattern else None
        # The pair only, not a comma after it: a line whose cuts are where another's are is
        # that line with other volatile pairs in their places, still valid JSON.
        self.cut_pattern = rf"{self.names_pattern}\s*{value}" if names else None

    def raw_hash(self, text: pl.Expr) -> pl.Expr:
        """The raw hash of each line of ``text`` (a String column); null where it is null or
        has CUT_MARK."""
        blanked = text.str.replace_all(self.cut_pattern, CUT_MARK) if self.cut_pattern else text
        # A line is the same however it ends. (Cut apart from the volatile attributes: one more
        # alternative in the pattern doubles the time the regex takes.)
        blanked = blanked.str.strip_chars_end("\r\n")
        first, second = (blanked.hash(seed).cast(pl.UInt128) for seed in self.seeds)
        # A line that has the mark itself (not valid JSON) could pass for a line cut there.
        marked = text.str.contains(CUT_MARK, literal=True)
        return pl.when(marked.not_()).then(first * 2**64 + second)

    def volatile_names(self, line: bytes) -> int:
        """How many keys of a volatile name a line has, at any depth. Counted for the lines
        that are parsed only (``volatile_only_cut``), not in the pass over every line."""
        return len(self.names_regex.findall(line)) if self.names_regex else 0

    def scan(self, block: Block) -> tuple[pl.DataFrame, int]:
        """The non-blank lines of a block of whole lines: ``line`` (its number in the block,
        from 1), ``data`` (its bytes, newline included) and ``raw_hash`` (null for a line that is
        not UTF-8); and how many lines the block has, blank ones included."""
        lines = pa.chunked_array([_split_lines(part) for part in block], pa.large_binary())
        data = pl.from_arrow(lines)
        assert isinstance(data, pl.Series)
        try:
            text = data.cast(pl.String)
        except pl.exceptions.PolarsError:  # some line is not UTF-8: find which, in Python
            text = pl.Series([_utf8_or_none(line) for line in data.to_list()], dtype=pl.String)
        scanned = (
            pl.DataFrame({"data": data, "text": text})
            .lazy()
            .with_row_index("line", offset=1)
            .filter(~pl.col("text").str.contains(r"^\s*$").fill_null(False))
            .select(
                pl.col("line").cast(pl.Int64),
                "data",
                raw_hash=self.raw_hash(pl.col("text")),
            )
            .collect(engine="streaming")  # in morsels, on every core
        )
        return scanned, len(lines)

    def __call__(self, line: bytes) -> int | None:
        scanned, _ = self.scan([line])
        return scanned.item(0, "raw_hash") if scanned.height else None


class HashIndex:
    """128-bit hashes (a snapshot's raw hashes, or its identities') sorted once, to find the row
    of each hash of a block: a hash join would walk every snapshot row again for every block.

    The hashes are uniform, so their top bits say where in the sorted array a hash must be: a
    table of where each such bucket starts makes a lookup read one or two entries, where a binary
    search reads twenty (each a cache miss at a million rows). About 22 bytes a row.
    """

    def __init__(self, high: np.ndarray, low: np.ndarray, rows: np.ndarray | None = None) -> None:
        """One 128-bit hash per row, as its high and low 64 bits (``halves``); ``rows``: the row
        of each hash, when not its position (rows without a hash are left out by the caller)."""
        # Sorted by the high half only, on polars' threads (a quarter of numpy's lexsort of both
        # halves): a lookup compares both halves with every entry of its bucket anyway.
        order = pl.Series(high, dtype=pl.UInt64).arg_sort().to_numpy()
        self.high, self.low = high[order], low[order]
        self.rows = order.astype(np.uint32) if rows is None else rows[order].astype(np.uint32)
        del order
        # About two hashes per bucket: a lookup reads one or two entries, and the table of where
        # each bucket starts takes 2 bytes a row (one hash per bucket took 4 to 8).
        bits = max(1, len(self.rows).bit_length() - 1)
        self.shift = np.uint64(64 - bits)
        self.starts = np.zeros(2**bits + 1, dtype=np.uint32)
        buckets = (self.high >> self.shift).astype(np.uint32)
        np.cumsum(np.bincount(buckets, minlength=2**bits), out=self.starts[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def find(self, hashes: pl.Series) -> np.ndarray:
        """The row of each hash, or -1 where it is null or not known."""
        found = np.full(len(hashes), -1, dtype=np.int64)
        if not len(self.rows):
            return found
        high, low = halves(hashes.fill_null(0))
        bucket = high >> self.shift
        at, end = self.starts[bucket], self.starts[bucket + 1]
        # Compare each hash with its bucket's entries, one entry of every bucket per round.
        todo = np.flatnonzero((at < end) & hashes.is_not_null().to_numpy())
        at, end = at[todo], end[todo]
        while todo.size:
            hit = (self.high[at] == high[todo]) & (self.low[at] == low[todo])
            found[todo[hit]] = self.rows[at[hit]]
            at += 1
            more = ~hit & (at < end)
            todo, at, end = todo[more], at[more], end[more]
        return found


def halves(raw_hashes: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 64 bits of 128-bit hashes, as numpy arrays."""
    halves = pl.DataFrame({"h": raw_hashes}).select(
        high=pl.col("h").floordiv(2**64).cast(pl.UInt64),
        low=(pl.col("h") % 2**64).cast(pl.UInt64),
    )
    return halves.get_column("high").to_numpy(), halves.get_column("low").to_numpy()


def _utf8_or_none(line: bytes) -> str | None:
    try:
        return line.decode()
    except UnicodeDecodeError:
        return None


def _split_lines(block: bytes | memoryview) -> pa.LargeBinaryArray:
    """A block's lines as an Arrow array over the block's own bytes (no copy per line)."""
    view = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(view == ord("\n")) + 1
    if view.size and (ends.size == 0 or ends[-1] != view.size):
        ends = np.append(ends, view.size)  # a last line without its newline
    offsets = np.concatenate((np.zeros(1, dtype=np.int64), ends.astype(np.int64)))
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), int(ends.size), [None, pa.py_buffer(offsets), pa.py_buffer(block)]
    )


def line_blocks(content: bytes | Iterable[bytes]) -> Iterator[Block]:
    """Blocks of whole lines of about BLOCK_BYTES from a file held whole (sliced, not copied)
    or streamed in pieces (an S3 body: only about one block is held at a time).

    A block is a few buffers: the pieces' whole lines as they lie (not copied), and between
    them each line that began in one piece and ended in another (joined).
    """
    if isinstance(content, bytes | bytearray):
        view, start = memoryview(content), 0
        while start < len(content):
            end = content.rfind(b"\n", start, start + BLOCK_BYTES) + 1
            if end <= start:  # one line longer than a block
                end = content.find(b"\n", start + BLOCK_BYTES) + 1 or len(content)
            yield [view[start:end]]
            start = end
        return
    block: Block = []
    size = 0
    begun: list[bytes] = []  # the start of a line: pieces it lies in, not ended yet
    for piece in content:
        last = piece.rfind(b"\n")
        if last < 0:  # a piece within one line
            begun.append(piece)
            continue
        first = piece.find(b"\n")
        if begun:
            block.append(b"".join([*begun, piece[: first + 1]]))
            start = first + 1
        else:
            start = 0
        if last >= start:
            block.append(memoryview(piece)[start : last + 1])
        size += sum(len(part) for part in begun) + last + 1
        begun = [piece[last + 1 :]] if last + 1 < len(piece) else []
        if size >= BLOCK_BYTES:
            yield block
            block, size = [], 0
    if begun:
        block.append(b"".join(begun))
    if block:
        yield block


@dataclass
class ParsedEntities:
    # The valid entities (ENTITY_SCHEMA), when held; None for a spilled parse, whose ``rows``
    # have them (``frame`` reads them back when first asked for).
    held: pl.DataFrame | None
    issues: list[EntityIssue]
    lines: int
    last_sync_ms: int | None = None  # newest lastSyncRunAt: when the source was read
    # Non-blank lines of each file, as parsed: what a manifest's record counts are checked against.
    lines_by_file: dict[str, int] = field(default_factory=dict)
    # Lines recognised as unchanged by their raw hash (UNCHANGED_SCHEMA), not parsed.
    unchanged: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=UNCHANGED_SCHEMA))
    # The spilled entity JSON, references and hashes (``spilled_entities``), when the parse
    # was given a folder.
    entities: pl.LazyFrame | None = None
    # A spilled parse's files of parsed rows (``_spill_part``), in the order of ``frame``.
    rows: list[Path] = field(default_factory=list)

    @property
    def frame(self) -> pl.DataFrame:
        """The valid entities (ENTITY_SCHEMA). ``parse_files`` lists them by type rank, then in
        the order of the lines: the order of a plan's creates, so a first batch's diff lists
        them as they are (a sort copied them all). A spilled parse's are read from its files
        when first asked for, in one chunk (``_one_chunk``): a first batch's diff streams them
        instead (``scan``), and holds none."""
        if self.held is None:
            self.held = _one_chunk(list(self.rows))
        return self.held

    @property
    def spilled(self) -> bool:
        """Whether the rows wait in files (``rows``) and are not held (yet)."""
        return self.held is None

    def scan(self) -> pl.LazyFrame:
        """``frame``, scanned: a spilled parse's rows are read from their files in a stream, and
        those that wait in the spill (WAITING) are null."""
        if self.held is not None:
            return self.held.lazy()
        waiting = [pl.lit(None, ENTITY_SCHEMA[name]).alias(name) for name in WAITING]
        return pl.scan_ipc(self.rows).with_columns(waiting).select(list(ENTITY_SCHEMA))


@dataclass
class _ScannedBlock:
    """A block of lines after the raw-hash pass: how many lines (``lines`` non-blank, ``span``
    with the blank ones), which are unchanged (frame in UNCHANGED_SCHEMA) and which must be
    parsed (line number, bytes, raw hash). Scanned, the lines are numbered from 1 in the block;
    ``renumber`` makes them the file's."""

    source_file: str
    lines: int
    span: int
    unchanged: pl.DataFrame | None
    to_parse: list[tuple[int, bytes, int | None]]

    def renumber(self, first_line: int) -> None:
        shift = first_line - 1
        if not shift:
            return
        if self.unchanged is not None:
            self.unchanged = self.unchanged.with_columns(pl.col("line") + shift)
        self.to_parse = [(number + shift, line, raw) for number, line, raw in self.to_parse]


# Blocks scanned at once: one block's single-threaded parts (splitting its lines, the lookup)
# overlap another's polars query.
SCAN_WORKERS = 2


def _scanned_blocks(
    files: Iterable[tuple[str, bytes | Iterable[bytes]]],
    hasher: RawHasher,
    known: HashIndex | None,
) -> Iterator[_ScannedBlock]:
    """Every file's blocks in order: read ahead by a thread of their own, scanned by
    SCAN_WORKERS others. A block's line numbers are known once the blocks before it are."""
    blocks = read_ahead(
        (index, source_file, block)
        for index, (source_file, content) in enumerate(files)
        for block in line_blocks(content)
    )
    next_line: dict[int, int] = {}  # of each file
    with ThreadPoolExecutor(SCAN_WORKERS, thread_name_prefix="scan") as pool:
        pending: deque[tuple[int, Future[_ScannedBlock]]] = deque()

        def first_pending() -> _ScannedBlock:
            index, scanning = pending.popleft()
            scanned = scanning.result()
            first_line = next_line.get(index, 1)
            next_line[index] = first_line + scanned.span
            scanned.renumber(first_line)
            return scanned

        for index, source_file, block in blocks:
            pending.append((index, pool.submit(_scan_block, source_file, block, hasher, known)))
            if len(pending) > SCAN_WORKERS:
                yield first_pending()
        while pending:
            yield first_pending()


def _scan_block(
    source_file: str, block: Block, hasher: RawHasher, known: HashIndex | None
) -> _ScannedBlock:
    scanned, span = hasher.scan(block)
    lines = scanned.height
    unchanged = None
    if known is not None:
        matched = known.find(scanned.get_column("raw_hash"))
        hit = pl.Series(matched >= 0)
        unchanged = scanned.filter(hit).select(
            snapshot_row=pl.Series(matched[matched >= 0], dtype=pl.UInt32),
            source_file=pl.lit(source_file, pl.Categorical),
            line=pl.col("line").cast(pl.UInt32),
        )
        scanned = scanned.filter(~hit)
    return _ScannedBlock(source_file, lines, span, unchanged, scanned.rows())


def read_ahead(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced by a worker thread up to ``depth`` ahead of the consumer: a batch's
    pieces are read (from S3, a file) while the blocks before them are scanned and parsed.

    Scanning a block (the raw-hash pass in polars, the lookup in numpy) runs mostly without the
    GIL, so it overlaps the parse's Python work on the blocks before: the steps share two cores
    instead of taking turns on one.
    """
    end = object()
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as worker:
        # One worker runs the next() calls one after another, in order.
        pending = deque(worker.submit(next, items, end) for _ in range(depth))
        while (item := pending.popleft().result()) is not end:
            pending.append(worker.submit(next, items, end))
            yield item


def parse_files(
    files: Iterable[tuple[str, bytes | Iterable[bytes]]],
    volatile: Iterable[str],
    max_line_bytes: int = MAX_LINE_BYTES,
    known_raw: HashIndex | None = None,
    spill: Path | None = None,
) -> ParsedEntities:
    """Parse JSON-lines files into one frame of valid entities; every bad line becomes an issue.

    A file is its bytes or an iterable of pieces of them (streamed). Lines whose raw hash is in
    ``known_raw`` (``diff.recognisable``: the snapshot's raw hashes and rows) are unchanged: they
    are listed in ``unchanged`` with their snapshot row, and not parsed. ``spill``: a folder the
    entity JSON, references and hashes are written to, a block at a time (``entities``),
    once the batch's JSON passes HELD_JSON_BYTES (then the blocks held until then too); each
    block's parsed rows are written there as well (``rows/``), and stay there until asked for
    (``ParsedEntities.frame``, ``ParsedEntities.scan``).
    """
    volatile_set = frozenset(volatile)
    hasher = RawHasher(volatile_set)
    rows: dict[str, list] = {name: [] for name in ENTITY_SCHEMA}
    # By type rank, each block's part: held, or (once the JSON is spilled) a file of the spill.
    parts: dict[int, list[pl.DataFrame | Path]] = {}
    unchanged: list[pl.DataFrame] = [pl.DataFrame(schema=UNCHANGED_SCHEMA)]
    issues: list[EntityIssue] = []
    total = 0
    lines_by_file: dict[str, int] = {}
    last_sync_ms: int | None = None
    known = known_raw if known_raw is not None and len(known_raw) else None
    spilled = held = 0  # rows spilled; bytes of JSON held
    spilling = False  # once the JSON held passes HELD_JSON_BYTES

    def spilled_part(part: pl.DataFrame | Path) -> Path:
        nonlocal spilled
        assert spill is not None and isinstance(part, pl.DataFrame)
        path = _spill_part(part, spill, spilled)
        spilled += part.height
        return path

    for block in _scanned_blocks(files, hasher, known):
        source_file = block.source_file
        total += block.lines
        lines_by_file[source_file] = lines_by_file.get(source_file, 0) + block.lines
        if block.unchanged is not None:
            unchanged.append(block.unchanged)
        for number, line, raw in block.to_parse:
            if line.endswith(b"\n"):
                line = line[:-1]
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
            if raw is not None and not volatile_only_cut(
                attributes, volatile_set, hasher.volatile_names(line)
            ):
                raw = None  # parsed every time, never recognised
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
            rows["missing"].append(missing_required(entity))
            rows["entity_row"].append(None)
        if rows["line"]:
            # A block's rows become a frame at once: the Python strings of a whole batch's
            # changed entities would outweigh the frame (and the allocator keeps what they took).
            frame = _entity_frame(rows)
            if spill is not None and not spilling:
                held += frame.get_column("entity").str.len_bytes().sum()
                spilling = held > HELD_JSON_BYTES
                if spilling:  # a large batch: spilled whole, what was held too
                    for rank_parts in parts.values():
                        rank_parts[:] = [spilled_part(part) for part in rank_parts]
            for rank, part in _by_type_rank(frame):
                # Its rows too, not only its JSON: ``_one_chunk`` says why.
                parts.setdefault(rank, []).append(spilled_part(part) if spilling else part)
            rows = {name: [] for name in ENTITY_SCHEMA}
    _return_freed_memory()
    in_rank_order = [part for rank in sorted(parts) for part in parts[rank]]
    parts.clear()
    files = [part for part in in_rank_order if isinstance(part, Path)]
    return ParsedEntities(
        # Spilled, the rows stay in their files until asked for (``frame``, ``scan``).
        held=None if files else _one_chunk(in_rank_order),
        rows=files,
        issues=issues,
        lines=total,
        last_sync_ms=last_sync_ms,
        lines_by_file=lines_by_file,
        unchanged=pl.concat(unchanged, how="vertical"),
        entities=spilled_entities(spill) if spill is not None and spilling else None,
    )


def _by_type_rank(frame: pl.DataFrame) -> Iterator[tuple[int, pl.DataFrame]]:
    """A block's entities split by type rank, each part in the order of its lines. (The files
    of a connector's run hold one type each: most blocks are one part, not copied.)"""
    ranks = frame.select(type_rank()).to_series()
    if ranks.n_unique() == 1:
        yield ranks[0], frame
        return
    parts = frame.with_columns(rank=ranks).partition_by("rank", maintain_order=True, as_dict=True)
    for (rank,), part in parts.items():
        yield int(rank), part.drop("rank")


def _spill_part(part: pl.DataFrame, folder: Path, first_row: int) -> Path:
    """A block's part spilled, its rows numbered from ``first_row`` (``entity_row``): their
    JSON, references and hashes (SPILLED) to a parquet file in ``folder`` named by that row, so
    that the files in name order are the spill, row ``entity_row`` of it each entity's; their
    other columns to an Arrow IPC file in ``folder/rows`` (uncompressed: the fastest to write
    and to read a column of), whose path takes the part's place in the parse.

    The references are the frame's largest column, and none of the diff's work reads them: they
    wait on disk with the JSON. (Held, a 5M first batch's took about 530 MB of each step.) So do
    the hashes (64 bytes a row held): the diff reads back the content hashes of the few rows it
    compares (``spilled_values``)."""
    numbered = part.with_columns(
        entity_row=pl.int_range(first_row, first_row + part.height, dtype=pl.UInt32)
    )
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    # lz4: the fastest to write and read back; the files live as long as the step.
    numbered.select(SPILLED).write_parquet(folder / f"{first_row:010d}.parquet", compression="lz4")
    rows = folder / "rows" / f"{first_row:010d}.arrow"
    numbered.drop(WAITING).write_ipc(rows, compression="uncompressed")
    return rows


def _one_chunk(parts: list[pl.DataFrame | Path]) -> pl.DataFrame:
    """The parse's parts (held, or files of ``_spill_part``) in order, as one frame in one
    chunk: polars copies the strings of a many-chunk frame on every join or gather (the diff's
    and the plan's), where it shares those of one.

    Built a column at a time, each column's pieces let go as it is done: the whole frame is
    never held twice (600 MB more at 5M). A spilled part's column is read alone. Parts held
    through a batch's parse pinned about 2.5 times their size (allocator pages shared with what
    the parse freed): spilled, a parse of the bench's three 1M files as one batch peaked at
    1,295 MB instead of 1,809 MB, and the bench's 5M first diff step at 2,085 MB instead of
    2,571 MB, for 2% more time.

    A parse spills all its parts or none. Spilled, the columns that wait in the spill (WAITING)
    are each one null, not a null a row: a column of nulls took 16 bytes a row (80 MB at 5M).
    """
    files = [part for part in parts if isinstance(part, Path)]
    assert not files or len(files) == len(parts), "a parse spills all its parts or none"
    columns: dict[str, pl.Series] = {}
    for name, dtype in ENTITY_SCHEMA.items():
        if files and name in WAITING:
            continue
        pieces = (
            [pl.scan_ipc(files).select(name).collect().get_column(name)]
            if files
            else [part.get_column(name) for part in parts if isinstance(part, pl.DataFrame)]
        )
        columns[name] = pl.concat([pl.Series(name, [], dtype), *pieces], rechunk=True)
        del pieces
        parts = [part.drop(name) if isinstance(part, pl.DataFrame) else part for part in parts]
    waiting = [pl.lit(None, ENTITY_SCHEMA[name]).alias(name) for name in WAITING if files]
    return pl.DataFrame(columns).with_columns(waiting).select(list(ENTITY_SCHEMA))


def spilled_values(
    frame: pl.DataFrame, entities: pl.LazyFrame | None, names: list[str]
) -> pl.DataFrame:
    """``frame`` with its columns ``names`` read from ``entities`` (a parse's spill) for its
    rows that have an ``entity_row``: for the few rows a diff compares, read in one stream over
    the spill."""
    rows = frame.get_column("entity_row").drop_nulls()
    if entities is None or not rows.len():
        return frame
    read = (
        spilled_rows(entities, rows)
        .select("entity_row", *[pl.col(name).alias(f"{name}_spilled") for name in names])
        .collect(engine="streaming")
    )
    return (
        frame.join(read, on="entity_row", how="left", maintain_order="left")
        .with_columns(pl.coalesce(f"{name}_spilled", name).alias(name) for name in names)
        .select(frame.columns)
    )


def spilled_rows(entities: pl.LazyFrame, rows: pl.Series) -> pl.LazyFrame:
    """The rows numbered ``rows`` (``entity_row``) of ``entities`` (a parse's spill, a stored
    diff), with their numbers: a filter to stream, which reads only the columns selected."""
    numbered = entities.with_row_index("entity_row")
    return numbered.filter(pl.col("entity_row").is_in(rows.unique().implode()))


def spilled_entities(folder: Path) -> pl.LazyFrame:
    """The spill in ``folder`` (SPILLED): row ``entity_row`` an entity's JSON, references and
    hashes."""
    return pl.scan_parquet(sorted(folder.glob("*.parquet"))).select(SPILLED)


# JSON a parse given a spill folder holds; past it, it spills all of it: a usual batch's changed
# entities stay in memory (spilling them made the bench's 1M diff + plan about 6% slower, for
# 30 MB less at its peak), a source's first batch is spilled.
HELD_JSON_BYTES = 64 * 1024 * 1024

# Rows of JSON read, and of a frame filled, at a time by with_entities.
FILL_ROWS = 20_000
# Chunks of up to this many rows are sliced by with_entities, larger ones gathered.
SLICED_CHUNK_ROWS = 4 * FILL_ROWS


def with_entities(
    frame: pl.DataFrame | pl.LazyFrame, entities: pl.LazyFrame | None, scratch: Path
) -> pl.LazyFrame:
    """``frame`` with the JSON and references (and whatever else of FILLED ``entities`` has) of
    each row that has an ``entity_row`` read from ``entities``, whose row ``entity_row`` is that
    row's: a parse's spill (SPILLED), a stored diff.

    Neither is held whole. The frame is filled a chunk at a time, each written to a file in
    ``scratch``, which must outlive the frame returned (it scans them). A chunk is rows whose
    ``entity_row`` ascends within one window of FILL_ROWS rows of ``entities``, read by a
    slice: only that window is decoded. (A join, even streamed, buffered every entity.) A diff
    (in plan order) reads its spill once per type rank; a plan reads its diff once. A scanned
    frame (a first batch's diff) is filled as it streams, a batch of its rows at a time.
    """
    if entities is None:  # (a scanned frame, a stored diff's, has them all)
        return frame.lazy()
    if isinstance(frame, pl.DataFrame):
        if frame.get_column("entity_row").null_count() == frame.height:
            return frame.lazy()
        batches: Iterable[pl.DataFrame] = [frame]
    else:
        batches = frame.collect_batches(chunk_size=SLICED_CHUNK_ROWS, lazy=True)
    filled = [name for name in FILLED if name in entities.collect_schema()]
    scratch.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    for batch in batches:
        parts.extend(_filled(batch, entities, filled, scratch, len(parts)))
    return pl.scan_parquet(parts) if parts else frame.lazy()


def _filled(
    frame: pl.DataFrame, entities: pl.LazyFrame, filled: list[str], scratch: Path, start_at: int
) -> Iterator[Path]:
    """``frame`` filled (``with_entities``) a chunk at a time, each written to a file in
    ``scratch``, numbered from ``start_at``."""
    row = pl.col("entity_row")
    held = row.is_null()
    window = row // FILL_ROWS
    starts = (
        frame.select(
            (
                (held != held.shift(1)).fill_null(True)
                | (row <= row.shift(1)).fill_null(False)
                | (window != window.shift(1)).fill_null(False)
                | (held & (pl.int_range(pl.len()) % FILL_ROWS == 0))  # rows without JSON
            )
            .arg_true()
            .alias("start")
        )
        .get_column("start")
        .to_list()
    )
    # A slice keeps the string buffers of the chunks it falls in, and writing it goes through
    # them all: sliced, a frame of one large chunk (a parse's) took quadratic time to write, so
    # such a frame is gathered (copied) a part at a time. A frame of small chunks (read from a
    # stored diff: a chunk per row group) is sliced: at 5M rows, gathering its 251 chunks took
    # four times as long.
    sliced = _sliceable(frame)
    for number, (start, stop) in enumerate(zip(starts, [*starts[1:], frame.height], strict=True)):
        chunk = (
            frame.slice(start, stop - start)
            if sliced
            else frame.gather(pl.int_range(start, stop, eager=True))
        )
        wanted = chunk.get_column("entity_row")
        if not wanted.null_count():
            first = int(wanted[0])
            read = entities.slice(first, int(wanted[-1]) - first + 1).select(filled).collect()
            chunk = chunk.with_columns(
                read.get_column(name).gather(wanted - first) for name in filled
            )
        path = scratch / f"{start_at + number:08d}.parquet"
        chunk.write_parquet(path, compression="lz4")
        yield path


def _sliceable(frame: pl.DataFrame) -> bool:
    """Whether every column that holds data of variable size (strings, lists) is in chunks of
    at most SLICED_CHUNK_ROWS rows. (Numbers and columns of nulls slice at no cost.) Nulls are
    counted by an expression: a column of one value (``diff.read_changes``) is not spelled out
    row by row."""
    variable = [
        name
        for name, dtype in frame.schema.items()
        if dtype in (pl.String, pl.Binary) or dtype.is_nested()
    ]
    nulls = frame.select(pl.col(variable).null_count()).row(0) if variable else ()
    return not any(
        null_count < frame.height
        and max(frame.get_column(name).chunk_lengths(), default=0) > SLICED_CHUNK_ROWS
        for name, null_count in zip(variable, nulls, strict=True)
    )


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc; elsewhere nothing is done).

    Parsing frees the Python objects of every changed line into glibc's heap, which polars (it
    has an allocator of its own) never reuses: at 5M entities the diff and the plan that follow
    carried about 75 MB of it.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _entity_frame(rows: dict[str, list]) -> pl.DataFrame:
    """ENTITY_SCHEMA from columns of Python values."""
    # Lists of structs built by Arrow in one call (polars would build a frame per row), from
    # the C heap: Arrow's default pool (mimalloc) kept what the blocks had freed, 120 MB at 1M.
    references = pl.from_arrow(
        pa.array(rows["references"], type=ARROW_REFERENCES, memory_pool=pa.system_memory_pool())
    )
    others = {name: values for name, values in rows.items() if name != "references"}
    frame = pl.DataFrame(others, schema={name: ENTITY_SCHEMA[name] for name in others})
    return frame.with_columns(references.alias("references")).select(list(ENTITY_SCHEMA))


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
