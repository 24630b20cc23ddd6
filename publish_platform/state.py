"""The state store: per-source snapshots and pointers, and per-batch diffs and plans, in S3.

Layout under the state prefix::

    sources/<source>/snapshots/<serial>-<plan>.parquet  immutable candidates, one row per entity
    sources/<source>/pointer.json                 current serial and snapshot; compare-and-swap
    sources/<source>/history/<serial>.json        every committed pointer, immutable
    batches/<app>/<workflow_id>/<run_id>/diff.parquet, diff.json
    batches/<app>/<workflow_id>/<run_id>/plan.parquet, plan.json, plan-isolated.jsonl
    batches/<app>/<workflow_id>/<run_id>/publish/<plan_id>/<first seq>.parquet  chunk checkpoints

``<source>`` is the connection qualified name percent-encoded into one path segment, so no source
can reach into another's prefix. Snapshots are written with ``If-None-Match: *`` (never replaced)
and the pointer with ``If-Match: <etag>``: two publishers racing for a source cannot both win.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import polars as pl
from botocore.exceptions import ClientError
from pydantic import BaseModel

from publish_platform.config import S3Location
from publish_platform.entities import REFERENCES
from publish_platform.landing import RunRef
from publish_platform.scratch import ScratchFolder

SNAPSHOT_SCHEMA = {
    "type_name": pl.String,
    "qualified_name": pl.String,
    "hash": pl.String,
    "guid": pl.String,
    "entity": pl.String,
    "references": REFERENCES,
    # The line's hash without its volatile attributes (entities.RawHasher): lets the next batch
    # recognise an unchanged line without parsing it. Null in snapshots written before it.
    "raw_hash": pl.UInt128,
}


class StaleStateError(RuntimeError):
    """The source's pointer moved since the plan was computed: re-plan, never overwrite."""


class Pointer(BaseModel):
    source: str
    serial: int
    snapshot_key: str
    partition_key: str
    source_timestamp: datetime | None = None
    published_at: datetime
    entities: int


def source_segment(connection_qualified_name: str) -> str:
    """One safe path segment for a source: no '/', no '..', nothing that escapes its prefix."""
    if not connection_qualified_name:
        raise ValueError("empty connection qualified name")
    return quote(connection_qualified_name, safe="").replace(".", "%2E")


def empty_snapshot() -> pl.DataFrame:
    return pl.DataFrame(schema=SNAPSHOT_SCHEMA)


IDENTITY_SEEDS = (0x5EED1, 0x5EED2)
# polars' hash may change between its versions: a snapshot's stored identity hashes are used
# only by the polars that wrote them (any other computes them again from the identities).
IDENTITY_HASHED_BY = f"polars {pl.__version__}"


def identity_hash() -> pl.Expr:
    """128 bits of each row's identity (type_name, qualified_name), for lookups in memory."""
    key = pl.struct("type_name", "qualified_name")
    first, second = (key.hash(seed).cast(pl.UInt128) for seed in IDENTITY_SEEDS)
    return first * 2**64 + second


# A snapshot stores its references as JSON text: a parquet reader filtering rows decodes a text
# column only where a row matches, but a nested column for every row (reading the 4% of rows a
# diff needs decoded all references of a million rows: 50 MB more, and slower).
STORED_REFERENCES = "references_json"


def _encoded_references() -> pl.Expr:
    wrapped = pl.struct(pl.col("references"))  # polars encodes structs: {"references": [...]}
    return wrapped.struct.json_encode().alias(STORED_REFERENCES)


def _decoded_references() -> pl.Expr:
    wrapped = pl.col(STORED_REFERENCES).str.json_decode(pl.Struct({"references": REFERENCES}))
    return wrapped.struct.field("references")


# Rows per row group of every parquet file the platform writes, and per morsel while a snapshot
# is streamed into the next: what bounds the memory of writing and streaming them. polars'
# defaults make a group of up to 512k rows, encoded whole: streaming a 5M-entity snapshot took
# 4.4 GB (with these, 0.65 GB and no more time); writing 244k changed entities (270 MB of JSON)
# took 310 MB more (with these, 100 MB).
ROW_GROUP_ROWS = 20_000
SNAPSHOT_STREAM_ROWS = 5_000


def frame_parquet(
    frame: pl.LazyFrame, target: Path, metadata: dict[str, str] | None = None
) -> None:
    """A frame streamed to a parquet file, as the platform writes them: never held whole."""
    with pl.Config(streaming_chunk_size=SNAPSHOT_STREAM_ROWS):
        frame.sink_parquet(
            target, compression="zstd", row_group_size=ROW_GROUP_ROWS, metadata=metadata
        )


def snapshot_parquet(snapshot: pl.DataFrame | pl.LazyFrame, target: Path) -> None:
    """A snapshot as stored, streamed to a file: SNAPSHOT_SCHEMA with its references as JSON
    text, plus each row's identity hash, so a diff finds rows by identity without decoding every
    identity again."""
    stored = (
        snapshot.lazy()
        .select(list(SNAPSHOT_SCHEMA))
        .with_columns(_encoded_references(), identity_hash=identity_hash())
        .drop("references")
    )
    frame_parquet(stored, target, metadata={"identity_hash": IDENTITY_HASHED_BY})


def snapshot_digest(path: Path) -> tuple[int, int]:
    """A snapshot file's row count and a digest of its rows in any order (read in a stream):
    equal for two files with the same rows, whatever their order or their writer's format."""
    rows = pl.struct(*SNAPSHOT_SCHEMA).hash(IDENTITY_SEEDS[0]).cast(pl.UInt128)
    found = scan_snapshot(path, payload=True).select(count=pl.len(), digest=rows.sum())
    count, digest = found.collect(engine="streaming").row(0)
    return int(count), int(digest or 0)


def load_snapshot(parquet: bytes | Path, payload: bool = True) -> pl.DataFrame:
    """A snapshot's parquet as SNAPSHOT_SCHEMA. ``payload=False`` leaves the entities' JSON out
    (null): most of its size, needed to publish or roll back but not to diff or plan."""
    source = io.BytesIO(parquet) if isinstance(parquet, bytes) else parquet
    return _normalized(pl.scan_parquet(source), payload).collect()


def scan_snapshot(path: Path, payload: bool = False, row_index: str | None = None) -> pl.LazyFrame:
    """A snapshot file as SNAPSHOT_SCHEMA plus ``identity_hash``, read lazily: what a diff needs
    of a large snapshot is read a column or a few rows at a time, never all of it at once.
    ``row_index`` names a first column of row numbers (numbered by the reader: a filter on
    another column then decodes the rest of a row only where it matches)."""
    scan = pl.scan_parquet(path, row_index_name=row_index)
    stored = pl.read_parquet_metadata(path).get("identity_hash") == IDENTITY_HASHED_BY
    hashes = pl.col("identity_hash") if stored else identity_hash().alias("identity_hash")
    return _normalized(scan, payload, [row_index] if row_index else [], [hashes])


def _normalized(
    snapshot: pl.LazyFrame,
    payload: bool,
    first: list[str] | None = None,
    last: list[pl.Expr] | None = None,
) -> pl.LazyFrame:
    """SNAPSHOT_SCHEMA from a snapshot of any age: references decoded from their JSON text (or
    taken as written, before they were stored as text); columns a snapshot was written without
    (``raw_hash`` before it existed) read as null, and so do raw hashes of an older kind (text):
    they could never match a line's."""
    present = snapshot.collect_schema()

    def column(name: str, dtype: pl.DataType) -> pl.Expr:
        if name == "references" and present.get(STORED_REFERENCES) == pl.String:
            return _decoded_references().alias(name)
        if name in present and present[name] == dtype and (payload or name != "entity"):
            return pl.col(name)
        return pl.lit(None, dtype).alias(name)

    return snapshot.select(
        *(first or []),
        *(column(name, dtype) for name, dtype in SNAPSHOT_SCHEMA.items()),
        *(last or []),
    )


class StateStore:
    def __init__(self, s3: Any, location: S3Location) -> None:
        self.s3 = s3
        self.location = location

    # --- keys ---

    def source_key(self, source: str, *parts: str) -> str:
        return self.location.key("sources", source_segment(source), *parts)

    def batch_key(self, partition_key: str, name: str) -> str:
        run = RunRef.from_partition_key(partition_key)  # validates every segment
        return self.location.key("batches", run.partition_key, name)

    def url(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{key}"

    # --- raw objects ---

    def put_bytes(self, key: str, data: bytes | IO[bytes], **conditions: str) -> str:
        response = self.s3.put_object(Bucket=self.location.bucket, Key=key, Body=data, **conditions)
        return response["ETag"]

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self.s3.get_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def download(self, key: str, target: Path) -> Path:
        """An object streamed to a file (large ones are never held whole in memory)."""
        try:
            self.s3.download_file(self.location.bucket, key, str(target))
        except ClientError as exc:
            if _not_found(exc):
                raise FileNotFoundError(self.url(key)) from exc
            raise
        return target

    def put_frame(self, key: str, frame: pl.DataFrame | pl.LazyFrame, **conditions: str) -> str:
        """A frame as parquet. A lazy one is streamed to a temporary file and uploaded from
        it: never held whole in memory."""
        if isinstance(frame, pl.LazyFrame):
            with ScratchFolder("upload") as scratch:
                path = scratch / "frame.parquet"
                frame_parquet(frame, path)
                return self.put_file(key, path, **conditions)
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        buffer.seek(0)
        return self.put_bytes(key, buffer, **conditions)  # read from the buffer: no copy

    def put_file(self, key: str, path: Path, **conditions: str) -> str:
        """A file uploaded as it is read (never held whole)."""
        with open(path, "rb") as body:
            return self.put_bytes(key, body, **conditions)

    def get_frame(self, key: str) -> pl.DataFrame:
        found = self.get_bytes(key)
        if found is None:
            raise FileNotFoundError(self.url(key))
        # One chunk (the reader makes one per row group): polars copies the strings of a frame
        # of many chunks on every join and gather, and shares those of one (as rechunking does).
        return pl.read_parquet(io.BytesIO(found[0])).rechunk()

    # --- pointer and snapshots ---

    def read_pointer(self, source: str) -> tuple[Pointer, str] | None:
        found = self.get_bytes(self.source_key(source, "pointer.json"))
        if found is None:
            return None
        return Pointer.model_validate_json(found[0]), found[1]

    def current_pointer(self, source: str) -> Pointer | None:
        found = self.read_pointer(source)
        return found[0] if found else None

    def current_serial(self, source: str) -> int:
        pointer = self.current_pointer(source)
        return pointer.serial if pointer else 0

    def read_snapshot(self, source: str, serial: int, payload: bool = True) -> pl.DataFrame:
        """A committed snapshot (see ``load_snapshot`` for ``payload``)."""
        if serial == 0:
            return empty_snapshot()
        key = self.snapshot_key_of(source, serial)
        found = self.get_bytes(key)
        if found is None:
            raise FileNotFoundError(self.url(key))
        return load_snapshot(found[0], payload)

    def download_snapshot(self, source: str, serial: int, folder: Path) -> Path | None:
        """A committed snapshot as a file in ``folder`` (streamed to disk, never held whole in
        memory), for ``scan_snapshot``; None for serial 0 (nothing published yet)."""
        if serial == 0:
            return None
        key = self.snapshot_key_of(source, serial)
        return self.download(key, folder / f"snapshot-{serial}.parquet")

    def snapshot_key_of(self, source: str, serial: int) -> str:
        """The committed snapshot of a serial: the pointer's, or the history's for older ones."""
        found = self.read_pointer(source)
        if found is not None and found[0].serial == serial:
            return found[0].snapshot_key
        entry = self.get_bytes(self.history_key(source, serial))
        if entry is None:
            raise FileNotFoundError(f"no committed snapshot {serial} for {source}")
        return Pointer.model_validate_json(entry[0]).snapshot_key

    def history_key(self, source: str, serial: int) -> str:
        return self.source_key(source, "history", f"{serial:012d}.json")

    def history(self, source: str) -> list[Pointer]:
        """Every committed serial of a source, oldest first."""
        prefix = self.source_key(source, "history/")
        entries = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found = self.get_bytes(item["Key"])
                if found is not None:
                    entries.append(Pointer.model_validate_json(found[0]))
        current = self.read_pointer(source)
        if current is not None and all(e.serial != current[0].serial for e in entries):
            entries.append(current[0])
        return sorted(entries, key=lambda p: p.serial)

    def snapshot_key(self, source: str, serial: int, attempt: str) -> str:
        return self.source_key(source, "snapshots", f"{serial:012d}-{attempt}.parquet")

    def write_snapshot(
        self, source: str, serial: int, snapshot: pl.DataFrame | pl.LazyFrame | Path, attempt: str
    ) -> str:
        """Write an immutable snapshot candidate for ``serial``; the pointer CAS commits one.

        Candidates are named by attempt (the plan id), so two publishers can never overwrite
        each other's, and a retry of the same plan finds (and accepts) its own. A snapshot is
        uploaded from a file (``snapshot_parquet``'s; a frame is written to one first): the
        publish step's streams through, never held whole in memory.
        """
        key = self.snapshot_key(source, serial, attempt)
        with ScratchFolder("snapshot") as scratch:
            if isinstance(snapshot, Path):
                ours = snapshot
            else:
                ours = scratch / "candidate.parquet"
                snapshot_parquet(snapshot, ours)
            try:
                self.put_file(key, ours, IfNoneMatch="*")
            except ClientError as exc:
                if not _precondition_failed(exc):
                    raise
                theirs = scratch / "existing.parquet"
                self.s3.download_file(self.location.bucket, key, str(theirs))
                if snapshot_digest(theirs) != snapshot_digest(ours):
                    raise StaleStateError(
                        f"snapshot candidate {key} exists with other content"
                    ) from exc
        return key

    def _record_history(self, pointer: Pointer) -> None:
        try:
            self.put_bytes(
                self.history_key(pointer.source, pointer.serial),
                pointer.model_dump_json().encode(),
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise

    def advance_pointer(self, pointer: Pointer, expected_serial: int) -> None:
        """Compare-and-swap the source's pointer from ``expected_serial`` to ``pointer.serial``.

        Each committed pointer is also kept, immutable, in ``history/`` (what rollback reads);
        an entry lost to a crash right after a commit is written by the next commit.
        """
        key = self.source_key(pointer.source, "pointer.json")
        current = self.read_pointer(pointer.source)
        current_serial = current[0].serial if current else 0
        if current_serial != expected_serial:
            raise StaleStateError(
                f"{pointer.source} is at serial {current_serial}, plan expected {expected_serial}"
            )
        if current is not None:
            self._record_history(current[0])
        condition = {"IfMatch": current[1]} if current else {"IfNoneMatch": "*"}
        body = pointer.model_dump_json().encode()
        try:
            self.put_bytes(key, body, **condition)
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise
            # The client retries a write whose answer was lost (connection reset, timeout);
            # if the first attempt went through, the retry is refused by the write itself.
            found = self.get_bytes(key)
            if found is None or found[0] != body:
                raise StaleStateError(f"{pointer.source} pointer moved during publish") from exc
        self._record_history(pointer)

    def list_sources(self) -> list[str]:
        """Connection qualified names that have a pointer."""
        from urllib.parse import unquote

        prefix = self.location.key("sources/")
        sources = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"):
            for entry in page.get("CommonPrefixes", []):
                sources.append(unquote(entry["Prefix"][len(prefix) :].rstrip("/")))
        return sources


def _not_found(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


def _precondition_failed(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    return error.get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict")


class ChunkCheckpoint:
    """Results of each applied chunk of one plan, under ``batches/<partition>/publish/<plan_id>/``.

    Keyed by the plan's content id: a re-run that recomputes the same plan on the same serial
    resumes from these; a different plan starts afresh.
    """

    def __init__(
        self, state: StateStore, partition_key: str, plan_id: str, schema: dict[str, Any]
    ) -> None:
        self.state = state
        self.schema = schema
        self.prefix = state.batch_key(partition_key, f"publish/{plan_id}/")

    def done(self) -> pl.DataFrame:
        parts = [pl.DataFrame(schema=self.schema)]
        paginator = self.state.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.state.location.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                parts.append(self.state.get_frame(item["Key"]).cast(self.schema))
        return pl.concat(parts, how="vertical").unique("seq", keep="first")

    def record(self, results: pl.DataFrame) -> None:
        first = int(results.get_column("seq").min())
        self.state.put_frame(f"{self.prefix}{first:012d}.parquet", results)
