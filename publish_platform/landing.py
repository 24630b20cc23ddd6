"""Discover workflow runs in the landing prefix and read their data.

The Application SDK writes one folder per workflow run::

    <landing>artifacts/apps/<app>/workflows/<workflow_id>/<run_id>/
        transformed/<entity>/entities.json             SDK 3.x
        transformed/<type>/chunk-<n>-part<k>.json      SDK 2.x (statistics/ beside it)
        <data file>.sha256                             optional checksum sidecar
        publish-request.json                           optional completion manifest
        raw/...                                        never published

One run folder is one batch and one Dagster partition, keyed ``<app>/<workflow_id>/<run_id>``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from publish_platform.config import S3Location

if TYPE_CHECKING:  # imported where used: discovery and ordering need no polars
    from pathlib import Path

    from publish_platform.entities import HashIndex, ParsedEntities

MANIFEST_NAME = "publish-request.json"
SIDECAR_SUFFIX = ".sha256"
RUNS_ROOT = "artifacts/apps/"
T = TypeVar("T")
R = TypeVar("R")
# One path segment of a run folder: what the SDK writes (names, UUIDs), never '..' or empty.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@=+-]{0,199}$")


class InvalidRunFolder(ValueError):
    """A run folder whose path cannot be a batch (unsafe or malformed segments)."""


def unsafe_path(relative: str) -> str | None:
    """Why a path relative to a run folder is unsafe (absolute, or a '.', '..' or empty
    segment), or None. S3 keys are opaque, but whatever resolves such a path (a sync to disk,
    a console) puts it elsewhere than where it is listed; the SDK never writes one. A folder
    marker (a key ending in '/', as S3 consoles create) is fine."""
    if relative.startswith("/"):
        return "absolute path"
    relative = relative.removesuffix("/")
    if not relative:
        return None
    for segment in relative.split("/"):
        if segment in ("", ".", ".."):
            return f"path segment {segment!r}" if segment else "empty path segment"
    return None


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="Key relative to the run folder, e.g. transformed/table/entities.json"
    )
    records: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("path")
    @classmethod
    def _inside_run_folder(cls, path: str) -> str:
        problem = unsafe_path(path)
        if problem:
            raise ValueError(f"must be a relative path inside the run folder ({problem})")
        return path


class PriorityHints(BaseModel):
    model_config = ConfigDict(extra="forbid")

    importance: int | None = Field(default=None, ge=0, le=100)


class PublishRequest(BaseModel):
    """The completion manifest ``publish-request.json``: this platform's contract."""

    model_config = ConfigDict(extra="forbid")

    connection_qualified_name: str = Field(min_length=1)
    workflow_id: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    status: Literal["SUCCEEDED", "FAILED", "CANCELLED", "TERMINATED", "TIMED_OUT"]
    source_timestamp: datetime
    processing_timestamp: datetime
    mode: Literal["full", "incremental"] = "full"
    files: list[ManifestFile] | None = None
    priority: PriorityHints | None = None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class RunRef:
    """Where a run folder is, and its partition key."""

    app: str
    workflow_id: str
    run_id: str

    @property
    def partition_key(self) -> str:
        return f"{self.app}/{self.workflow_id}/{self.run_id}"

    def prefix_in_landing(self) -> str:
        return RUNS_ROOT + f"{self.app}/workflows/{self.workflow_id}/{self.run_id}/"

    def prefix(self, landing: S3Location) -> str:
        return landing.key(self.prefix_in_landing())

    @classmethod
    def from_partition_key(cls, partition_key: str) -> RunRef:
        parts = partition_key.split("/")
        if len(parts) != 3:
            raise InvalidRunFolder(
                f"partition key must be app/workflow_id/run_id: {partition_key!r}"
            )
        for part in parts:
            if not _SEGMENT.match(part):
                raise InvalidRunFolder(f"unsafe path segment {part!r} in {partition_key!r}")
        return cls(*parts)


@dataclass
class RunListing:
    """Every object of one run folder, classified."""

    run: RunRef
    prefix: str
    objects: list[ObjectInfo]
    data_files: list[ObjectInfo] = field(default_factory=list)
    sidecars: dict[str, ObjectInfo] = field(default_factory=dict)
    manifest: ObjectInfo | None = None

    def __post_init__(self) -> None:
        for obj in self.objects:
            rel = obj.key[len(self.prefix) :]
            if rel == MANIFEST_NAME:
                self.manifest = obj
            elif rel.startswith("transformed/"):
                if rel.endswith(SIDECAR_SUFFIX):
                    self.sidecars[obj.key[: -len(SIDECAR_SUFFIX)]] = obj
                elif is_data_file(rel):
                    self.data_files.append(obj)
        self.data_files.sort(key=lambda o: o.key)

    @property
    def last_modified(self) -> datetime | None:
        return max((o.last_modified for o in self.objects), default=None)

    def fingerprint(self) -> str:
        """Changes whenever an object of the folder is added, removed or rewritten."""
        digest = hashlib.sha256()
        for obj in sorted(self.objects, key=lambda o: o.key):
            digest.update(f"{obj.key}\0{obj.size}\0{obj.last_modified.isoformat()}\n".encode())
        return digest.hexdigest()[:16]


def is_data_file(relative_key: str) -> bool:
    """Only ``transformed/**/*.json`` is data; statistics and anything else are not."""
    parts = relative_key.split("/")
    return (
        parts[0] == "transformed"
        and relative_key.endswith(".json")
        and "statistics" not in parts[1:-1]
    )


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str


def assess_readiness(listing: RunListing, now: datetime, settle_seconds: float) -> Readiness:
    """Is this run folder complete? A manifest says so; without one, a quiet settle period does."""
    if listing.manifest is not None:
        return Readiness(True, "completion manifest present")
    last = listing.last_modified
    if last is None:
        return Readiness(False, "empty run folder")
    quiet_for = (now - last).total_seconds()
    if quiet_for < settle_seconds:
        return Readiness(False, f"changed {quiet_for:.0f}s ago, settling for {settle_seconds:.0f}s")
    if listing.sidecars:
        missing = [o.key for o in listing.data_files if o.key not in listing.sidecars]
        if missing:
            return Readiness(False, f"{len(missing)} data file(s) still without their .sha256")
    return Readiness(True, f"no change for {quiet_for:.0f}s")


# --- S3 access -------------------------------------------------------------------------------


def _common_prefixes(s3: Any, bucket: str, prefix: str) -> Iterator[str]:
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for entry in page.get("CommonPrefixes", []):
            yield entry["Prefix"]


def iter_run_folders(s3: Any, landing: S3Location) -> Iterator[RunRef | InvalidRunFolder]:
    """Every run folder under the landing prefix, from delimiter listings.

    The listing walks apps → workflows → runs with ``Delimiter='/'``: one LIST call per thousand
    run folders, never a listing of the files of runs that are already known. The workflows'
    folders are listed LISTING_THREADS at a time.
    """
    root = landing.key(RUNS_ROOT)
    workflows = [
        (app_prefix[len(root) :].rstrip("/"), wf_prefix)
        for app_prefix in _common_prefixes(s3, landing.bucket, root)
        for wf_prefix in _common_prefixes(s3, landing.bucket, app_prefix + "workflows/")
    ]
    run_prefixes = in_parallel(
        lambda wf_prefix: list(_common_prefixes(s3, landing.bucket, wf_prefix)),
        [wf_prefix for _, wf_prefix in workflows],
    )
    for (app, wf_prefix), runs in zip(workflows, run_prefixes, strict=True):
        workflow_id = wf_prefix.rstrip("/").rsplit("/", 1)[-1]
        for run_prefix in runs:
            run_id = run_prefix[len(wf_prefix) :].rstrip("/")
            key = f"{app}/{workflow_id}/{run_id}"
            try:
                yield RunRef.from_partition_key(key)
            except InvalidRunFolder as exc:
                yield exc


# LIST calls in flight at once in a discovery pass. Each waits on S3 for tens of milliseconds:
# one after another, the folders of fifty workflows took seconds of every sensor tick.
LISTING_THREADS = 8


def in_parallel(function: Callable[[T], R], items: list[T]) -> list[R]:
    """``function`` of each item, LISTING_THREADS calls at once, the results in item order.
    (boto3's clients are thread-safe.)"""
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(LISTING_THREADS, thread_name_prefix="s3-list") as pool:
        return list(pool.map(function, items))


def list_run(s3: Any, landing: S3Location, run: RunRef) -> RunListing:
    prefix = run.prefix(landing)
    objects: list[ObjectInfo] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=landing.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            objects.append(ObjectInfo(item["Key"], item["Size"], item["LastModified"]))
    return RunListing(run=run, prefix=prefix, objects=objects)


def run_of_key(landing: S3Location, key: str) -> RunRef | InvalidRunFolder | None:
    """The run folder an object key lies in (None: not under the landing's run folders)."""
    root = landing.key(RUNS_ROOT)
    if not key.startswith(root):
        return None
    parts = key[len(root) :].split("/")
    if len(parts) < 5 or parts[1] != "workflows":
        return None
    try:
        return RunRef.from_partition_key(f"{parts[0]}/{parts[2]}/{parts[3]}")
    except InvalidRunFolder as exc:
        return exc


@dataclass
class LandingEvents:
    """Run folders named by S3 notifications received from the landing queue."""

    runs: dict[str, RunRef | InvalidRunFolder] = field(default_factory=dict)
    receipts: list[str] = field(default_factory=list)
    receive_calls: int = 0


def receive_landing_events(
    sqs: Any, queue_url: str, landing: S3Location, max_messages: int = 5000
) -> LandingEvents:
    """Drain the landing queue (up to ``max_messages``): every ObjectCreated event names a key,
    hence a run folder. Messages are deleted by ``acknowledge`` once the tick used them; if the
    tick fails first they come back, and a lost one is caught by the periodic full listing."""
    events = LandingEvents()
    while len(events.receipts) < max_messages:
        answer = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=300
        )
        events.receive_calls += 1
        messages = answer.get("Messages", [])
        if not messages:
            break
        for message in messages:
            events.receipts.append(message["ReceiptHandle"])
            try:
                records = json.loads(message["Body"]).get("Records", [])
            except (ValueError, AttributeError):
                continue  # not an S3 notification (s3:TestEvent has no Records either)
            for record in records:
                key = unquote_plus(record.get("s3", {}).get("object", {}).get("key", ""))
                if record.get("s3", {}).get("bucket", {}).get("name") != landing.bucket:
                    continue
                run = run_of_key(landing, key)
                if isinstance(run, RunRef):
                    events.runs[run.partition_key] = run
                elif run is not None:
                    events.runs[str(run)] = run
    return events


def acknowledge(sqs: Any, queue_url: str, receipts: list[str]) -> None:
    """Delete handled messages, ten per call (SQS's batch limit)."""
    for start in range(0, len(receipts), 10):
        batch = receipts[start : start + 10]
        sqs.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(n), "ReceiptHandle": handle} for n, handle in enumerate(batch)],
        )


def read_object(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- Reading a batch -------------------------------------------------------------------------


@dataclass
class BatchProblem:
    """Something that makes a whole batch unpublishable (quarantine) or not to be published."""

    kind: Literal[
        "rejected_manifest",
        "checksum_mismatch",
        "count_mismatch",
        "no_data",
        "unsafe_key",
        "skipped",
        "superseded",
    ]
    message: str


@dataclass(frozen=True)
class LandedFile:
    """A data file of a batch, not read yet: its content is streamed once, as it is parsed
    (``parse_batch``), never held whole."""

    key: str
    relative_key: str
    size: int
    sidecar_sha256: str | None = None  # what its .sha256 sidecar says ('' if blank); None: none


@dataclass
class LandedBatch:
    """A run folder's data files and what its manifest (if any) says, with every problem that
    can be known without reading the data; checksums and record counts are verified as the
    data is read (``parse_batch``)."""

    run: RunRef
    bucket: str
    prefix: str
    files: list[LandedFile]
    manifest: PublishRequest | None
    problems: list[BatchProblem]
    landed_at: datetime | None

    @property
    def publishable(self) -> bool:
        return not self.problems


def read_batch(s3: Any, landing: S3Location, run: RunRef) -> LandedBatch:
    """Read a run folder's listing, manifest and sidecars, but not its data files: what is wrong
    with the batch short of its data (unsafe keys, a rejected manifest, an unsuccessful run,
    files missing from or not listed in the manifest, no data) is known before a byte of data is
    read, so such a batch never pays for reading it.

    Any problem concerns the whole batch: it is returned in ``problems`` and the batch is then
    never published, not even in part.
    """
    listing = list_run(s3, landing, run)
    problems: list[BatchProblem] = []
    for obj in listing.objects:
        relative = obj.key[len(listing.prefix) :]
        unsafe = unsafe_path(relative)
        if unsafe is not None:
            problems.append(BatchProblem("unsafe_key", f"object key {relative!r}: {unsafe}"))
    manifest: PublishRequest | None = None
    if listing.manifest is not None:
        raw = read_object(s3, landing.bucket, listing.manifest.key)
        try:
            manifest = PublishRequest.model_validate_json(raw)
        except ValidationError as exc:
            problems.append(BatchProblem("rejected_manifest", _summarize_validation(exc)))
        else:
            if manifest.workflow_id != run.workflow_id or manifest.run_id != run.run_id:
                problems.append(
                    BatchProblem(
                        "rejected_manifest",
                        f"manifest names workflow {manifest.workflow_id!r} run {manifest.run_id!r}"
                        f" but lies in {run.partition_key!r}",
                    )
                )
            if manifest.status != "SUCCEEDED":
                problems.append(
                    BatchProblem("skipped", f"workflow run status is {manifest.status}")
                )

    files = [
        LandedFile(
            obj.key,
            obj.key[len(listing.prefix) :],
            obj.size,
            _read_sidecar(s3, landing.bucket, listing.sidecars[obj.key])
            if obj.key in listing.sidecars
            else None,
        )
        for obj in listing.data_files
    ]
    if manifest is not None and manifest.files is not None:
        problems.extend(_verify_manifest_listing(manifest, files))
    if not files and not any(p.kind in ("rejected_manifest", "skipped") for p in problems):
        problems.append(BatchProblem("no_data", "run folder has no transformed/**/*.json data"))
    return LandedBatch(
        run, landing.bucket, listing.prefix, files, manifest, problems, listing.last_modified
    )


def _read_sidecar(s3: Any, bucket: str, sidecar: ObjectInfo) -> str:
    """The sha256 a ``.sha256`` sidecar states (its first word, as sha256sum writes it)."""
    text = read_object(s3, bucket, sidecar.key).decode("ascii", "replace")
    return text.strip().split()[0].lower() if text.strip() else ""


def _verify_manifest_listing(
    manifest: PublishRequest, files: list[LandedFile]
) -> list[BatchProblem]:
    """Files the manifest lists that did not land, and data files it does not list."""
    landed = {f.relative_key for f in files}
    listed = {entry.path for entry in manifest.files or []}
    problems = [
        BatchProblem("count_mismatch", f"manifest lists missing {entry.path}")
        for entry in manifest.files or []
        if entry.path not in landed
    ]
    unlisted = sorted(landed - listed)
    if unlisted:
        problems.append(
            BatchProblem("count_mismatch", f"data files not in the manifest: {', '.join(unlisted)}")
        )
    return problems


PIECE_BYTES = 8 * 1024 * 1024  # a data file is read from S3 this many bytes at a time


def stream_file(s3: Any, bucket: str, file: LandedFile, sha256s: dict[str, str]) -> Iterator[bytes]:
    """The file's content in pieces as S3 streams its body (one piece held at a time), hashed on
    the way: ``sha256s[file.relative_key]`` is set once the whole body has gone by.

    The object is requested when the first piece is asked for. An S3 error, at the request or in
    the middle of the body (a reset connection, a body shorter than announced), is raised as it
    comes, as ``read_object`` raises it: the step fails, and its retry reads the batch again.
    """
    digest = hashlib.sha256()
    body = s3.get_object(Bucket=bucket, Key=file.key)["Body"]
    try:
        for piece in body.iter_chunks(PIECE_BYTES):
            digest.update(piece)  # releases the GIL for large pieces
            yield piece
    finally:
        body.close()
    sha256s[file.relative_key] = digest.hexdigest()


def parse_batch(
    s3: Any,
    batch: LandedBatch,
    volatile: Iterable[str],
    known_raw: HashIndex | None = None,
    spill: Path | None = None,
) -> tuple[ParsedEntities, list[BatchProblem]]:
    """Parse the data files of a batch that ``read_batch`` found no problem with, and verify
    them on the same single read of each file: its sha256 against its sidecar and the manifest,
    its lines against the manifest's record count.

    The parsed entities are only good if no problem is returned: otherwise the batch is
    quarantined and they are discarded, so nothing of it is published.
    """
    from publish_platform.entities import parse_files

    if batch.problems:
        raise ValueError(f"batch {batch.run.partition_key} is not publishable: not read")
    sha256s: dict[str, str] = {}
    parsed = parse_files(
        ((f.relative_key, stream_file(s3, batch.bucket, f, sha256s)) for f in batch.files),
        volatile,
        known_raw=known_raw,
        spill=spill,
    )
    return parsed, verify_data(batch, sha256s, parsed.lines_by_file)


def verify_data(
    batch: LandedBatch, sha256s: dict[str, str], records: dict[str, int]
) -> list[BatchProblem]:
    """What only the data can tell: a sha256 that differs from its sidecar's or the manifest's,
    a record count that differs from the manifest's.

    ``sha256s``: the sha256 of every data file, by relative key, computed over the whole of it;
    ``records``: non-blank lines by relative key (a file without any may be absent), as
    ``parse_files`` counts them in ``lines_by_file``.
    """
    problems: list[BatchProblem] = []
    for landed in batch.files:
        digest, expected = sha256s[landed.relative_key], landed.sidecar_sha256
        if expected is not None and expected != digest:
            problems.append(
                BatchProblem(
                    "checksum_mismatch",
                    f"{landed.relative_key}: sha256 {digest} but sidecar says"
                    f" {expected or '(empty)'}",
                )
            )
    listed = batch.manifest.files if batch.manifest is not None else None
    for entry in listed or []:
        digest = sha256s.get(entry.path)
        if digest is None:
            continue  # listed but missing: found by read_batch
        if entry.sha256 and entry.sha256.lower() != digest:
            problems.append(
                BatchProblem(
                    "checksum_mismatch",
                    f"{entry.path}: sha256 {digest} but manifest says {entry.sha256}",
                )
            )
        lines = records.get(entry.path, 0)
        if entry.records is not None and lines != entry.records:
            problems.append(
                BatchProblem(
                    "count_mismatch",
                    f"{entry.path}: {lines} records but manifest says {entry.records}",
                )
            )
    return problems


def _summarize_validation(exc: ValidationError) -> str:
    errors = [
        f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}"
        for err in exc.errors()[:10]
    ]
    return "invalid publish-request.json: " + "; ".join(errors)


# --- Discovery (shared by the sensor and `publish-platform drain`) -----------------------------


@dataclass
class Discovery:
    """One pass over the landing prefix: what became ready, what is still settling, what is bad."""

    ready: list[RunListing] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # partition key -> reason
    rejected: list[str] = field(default_factory=list)  # run folders that can never be a batch
    deep_listings: int = 0


def discover(
    s3: Any,
    landing: S3Location,
    known: set[str],
    settle_seconds: float,
    now: datetime | None = None,
    runs: Iterable[RunRef | InvalidRunFolder] | None = None,
) -> Discovery:
    """Find run folders that are not yet partitions and are ready; oldest first.

    ``runs``: the run folders to look at (named by landing events); by default every one under
    the landing prefix. Only folders not in ``known`` are listed in depth, so a full pass costs
    what is new plus one shallow LIST call per thousand run folders of history.
    """
    now = now or utcnow()
    found = Discovery()
    new: list[RunRef] = []
    for ref in iter_run_folders(s3, landing) if runs is None else runs:
        if isinstance(ref, InvalidRunFolder):
            found.rejected.append(str(ref))
        elif ref.partition_key not in known:
            new.append(ref)
    listings = in_parallel(lambda ref: list_run(s3, landing, ref), new)
    found.deep_listings = len(listings)
    for ref, listing in zip(new, listings, strict=True):
        readiness = assess_readiness(listing, now, settle_seconds)
        if readiness.ready:
            found.ready.append(listing)
        else:
            found.waiting[ref.partition_key] = readiness.reason
    found.ready.sort(key=lambda listing: (listing.last_modified or now, listing.run.partition_key))
    return found
