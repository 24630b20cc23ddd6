"""``publish-platform load``: many batches of many sources landing at once, through the real
daemon, to the end.

Every batch must end COMPLETE, each source's batches must be committed in source-timestamp
order, nothing may be lost or duplicated, and each source's snapshot must agree with the catalog;
the command reports the time to drain. ``verify_source`` is also the outcome the fault tests
assert after every fault: the catalog holds exactly the batch published last (identities and
content hashes), and the source's current snapshot agrees with it.

Batches of a source are successive extractions of it: a sliding window of tables (one dropped and
one added per batch, with their columns), one changed description, and new volatile values on
every entity. Data files land first, then the manifests, oldest batch first across all sources,
as connectors finish their runs in time order.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from publish_platform.config import DEFAULT_VOLATILE_ATTRIBUTES, S3Location
from publish_platform.demo import manifest_for, run_files
from publish_platform.entities import content_hash
from publish_platform.landing import MANIFEST_NAME, RunRef
from publish_platform.local_s3 import put_files
from publish_platform.publish_state import PublishState, PublishStatus, derive_states
from publish_platform.state import StateStore

APP = "load"
TABLES = 4  # tables per extraction (a window sliding by one table per batch)
COLUMNS = 3  # columns per table


@dataclass
class LoadBatch:
    run: RunRef
    source: str
    index: int  # position of its source timestamp among the source's batches
    source_timestamp: datetime
    entities: list[dict]


def _ref(type_name: str, qualified_name: str) -> dict:
    return {
        "typeName": type_name,
        "attributes": None,
        "uniqueAttributes": {"qualifiedName": qualified_name},
    }


def extraction(
    source: str,
    index: int,
    run_id: str,
    at: datetime,
    tables: int = TABLES,
    columns: int = COLUMNS,
) -> list[dict]:
    """The source as its ``index``-th extraction saw it: 2 + tables × (1 + columns) entities."""
    stamp = int(at.timestamp() * 1000)

    def entity(type_name: str, path: str, **attributes: Any) -> dict:
        return {
            "typeName": type_name,
            "status": "ACTIVE",
            "attributes": {
                "qualifiedName": f"{source}/{path}",
                "name": path.rsplit("/", 1)[-1],
                "connectionQualifiedName": source,
                "lastSyncRun": run_id,
                "lastSyncRunAt": stamp,
                "lastSyncWorkflowName": f"{APP}-{source}",
                **attributes,
            },
            "customAttributes": {},
        }

    found = [
        entity("Database", "db"),
        entity("Schema", "db/s", database=_ref("Database", f"{source}/db")),
    ]
    for table in range(index, index + tables):
        path = f"db/s/t{table}"
        changed = {"description": f"extraction {index}"} if table == index + tables - 1 else {}
        found.append(entity("Table", path, atlanSchema=_ref("Schema", f"{source}/db/s"), **changed))
        found.extend(
            entity("Column", f"{path}/c{c}", order=c, table=_ref("Table", f"{source}/{path}"))
            for c in range(columns)
        )
    return found


def source_name(number: int) -> str:
    return f"default/{APP}/{1000 + number}"


def plan_load(sources: int, batches: int, now: datetime | None = None) -> list[LoadBatch]:
    """``batches`` batches spread over ``sources`` sources, one minute of data apart."""
    now = now or datetime.now(UTC)
    planned = []
    for number in range(batches):
        source_number, index = number % sources, number // sources
        source = source_name(source_number)
        run = RunRef(APP, f"wf-{source_number:03d}", str(uuid.uuid4()))
        at = now - timedelta(hours=1) + timedelta(minutes=index)
        planned.append(LoadBatch(run, source, index, at, extraction(source, index, run.run_id, at)))
    return planned


def land_load(s3: Any, landing: S3Location, batches: list[LoadBatch]) -> None:
    """Every batch's data files, then every manifest, oldest batch first across sources: a
    landing-sensor tick may see any prefix of a source's batches, never a newer one alone."""
    for batch in batches:
        files = run_files({"entities": batch.entities})
        put_files(s3, landing.bucket, batch.run.prefix(landing), files)
    for batch in sorted(batches, key=lambda b: (b.source_timestamp, b.source)):
        manifest = manifest_for(batch.source, batch.run.workflow_id, batch.run.run_id)
        manifest["source_timestamp"] = manifest["processing_timestamp"] = (
            batch.source_timestamp.isoformat()
        )
        put_files(
            s3,
            landing.bucket,
            batch.run.prefix(landing),
            {MANIFEST_NAME: run_files({}, manifest)[MANIFEST_NAME]},
        )


# --- outcome ---------------------------------------------------------------------------------


class SourceCheck(BaseModel):
    """A source's catalog and snapshot against the batch that should be published last."""

    source: str
    expected: int
    lost: int = 0  # expected identities not active in the catalog
    duplicated: int = 0  # identities more than once (catalog or snapshot)
    unexpected: int = 0  # active in the catalog, not in the batch
    changed: int = 0  # in both, with another content hash
    snapshot_disagrees: int = 0  # (identity, hash) in snapshot xor catalog
    serial: int = 0

    @property
    def ok(self) -> bool:
        return (
            not (self.lost or self.duplicated or self.unexpected or self.changed)
            and not self.snapshot_disagrees
        )


def catalog_rows(catalog_url: str, source: str) -> list[tuple[str, str, str]]:
    """(typeName, qualifiedName, content hash) of the source's active entities in the SQL
    catalog, read straight from its table."""
    from publish_platform.metastores.sql import create_catalog_engine
    from publish_platform.metastores.sql import entities as table

    engine = create_catalog_engine(catalog_url)
    try:
        query = sa.select(table.c.type_name, table.c.qualified_name, table.c.content_hash).where(
            (table.c.connection_qualified_name == source) & (table.c.status == "ACTIVE")
        )
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]
    finally:
        engine.dispose()


def verify_source(
    state: StateStore,
    catalog_url: str,
    source: str,
    expected: list[dict],
    volatile: tuple[str, ...] = DEFAULT_VOLATILE_ATTRIBUTES,
) -> SourceCheck:
    """Compare the catalog, the source's current snapshot and the expected entities."""
    volatile_set = frozenset(volatile)
    want = {
        (e["typeName"], e["attributes"]["qualifiedName"]): content_hash(e, volatile_set)
        for e in expected
    }
    rows = catalog_rows(catalog_url, source)
    have = {(t, q): h for t, q, h in rows}
    pointer = state.current_pointer(source)
    serial = pointer.serial if pointer else 0
    snapshot = state.read_snapshot(source, serial, payload=False)
    snapshot_rows = list(
        zip(snapshot["type_name"], snapshot["qualified_name"], snapshot["hash"], strict=True)
    )
    return SourceCheck(
        source=source,
        expected=len(want),
        lost=len(want.keys() - have.keys()),
        duplicated=len(rows) - len(have) + len(snapshot_rows) - len(set(snapshot_rows)),
        unexpected=len(have.keys() - want.keys()),
        changed=sum(1 for k in want.keys() & have.keys() if want[k] != have[k]),
        snapshot_disagrees=len(set(snapshot_rows) ^ set(rows)),
        serial=serial,
    )


def committed_order(state: StateStore, source: str) -> list[str]:
    """Partition keys of the source's commits, serial by serial."""
    return [pointer.partition_key for pointer in state.history(source)]


def order_violations(committed: list[str], batches: list[LoadBatch]) -> int:
    """Commits out of source-timestamp order, plus batches never committed."""
    index = {b.run.partition_key: b.index for b in batches}
    seen = [index[key] for key in committed if key in index]
    backwards = sum(1 for a, b in zip(seen, seen[1:], strict=False) if b <= a)
    return backwards + len(set(index) - set(committed))


def wait_for_batches(
    instance: Any, landing: str, keys: list[str], timeout: float, poll_s: float = 3.0
) -> dict[str, PublishState]:
    """Poll until every batch is COMPLETE (or settled otherwise for good); the last states."""
    final = {PublishStatus.COMPLETE, PublishStatus.SUPERSEDED, PublishStatus.QUARANTINED}
    final |= {PublishStatus.SKIPPED, PublishStatus.HELD}
    states: dict[str, PublishState] = {}
    pending = list(keys)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for state in derive_states(instance, landing, pending):
            states[state.partition_key] = state
        pending = [key for key in pending if states[key].status not in final]
        if pending:
            time.sleep(poll_s)
    return states


def source_overlaps(instance: Any, sources: set[str]) -> int:
    """Pairs of runs of one source that ran at the same time (the queue allows one)."""
    from dagster import RunsFilter

    from publish_platform.ordering import SOURCE_TAG

    intervals: dict[str, list[tuple[float, float]]] = {}
    for record in instance.get_run_records(RunsFilter(job_name="publish_batch")):
        source = record.dagster_run.tags.get(SOURCE_TAG)
        if source in sources and record.start_time and record.end_time:
            intervals.setdefault(source, []).append((record.start_time, record.end_time))
    overlaps = 0
    for spans in intervals.values():
        spans.sort()
        overlaps += sum(
            1 for (_, end), (start, _) in zip(spans, spans[1:], strict=False) if start < end
        )
    return overlaps


def check_load(
    instance: Any,
    landing: str,
    state: StateStore,
    catalog_url: str,
    batches: list[LoadBatch],
    landed_at: float,
    timeout: float,
) -> dict[str, Any]:
    """Wait for the batches to drain, then everything the load promises, as one JSON report.

    ``landed_at`` is the epoch time the last manifest landed: drain time runs from there to the
    end of the last batch's run.
    """
    keys = [b.run.partition_key for b in batches]
    states = wait_for_batches(instance, landing, keys, timeout)
    statuses: dict[str, int] = {}
    for found in states.values():
        statuses[found.status.value] = statuses.get(found.status.value, 0) + 1
    ends = []
    for found in states.values():
        record = (
            instance.get_run_record_by_id(found.dagster_run_id) if found.dagster_run_id else None
        )
        if found.status == PublishStatus.COMPLETE and record is not None and record.end_time:
            ends.append(record.end_time)
    by_source: dict[str, list[LoadBatch]] = {}
    for batch in batches:
        by_source.setdefault(batch.source, []).append(batch)
    violations = 0
    checks = []
    for source, own in sorted(by_source.items()):
        violations += order_violations(committed_order(state, source), own)
        last = max(own, key=lambda b: b.source_timestamp)
        checks.append(verify_source(state, catalog_url, source, last.entities))
    latencies = sorted(
        s.metrics.latency_s for s in states.values() if s.metrics.latency_s is not None
    )
    runs = sum(s.attempts for s in states.values())
    return {
        "batches": len(batches),
        "sources": len(by_source),
        "entities_per_batch": len(batches[0].entities) if batches else 0,
        "complete": statuses.get(PublishStatus.COMPLETE.value, 0),
        "statuses": statuses,
        "drain_s": round(max(ends) - landed_at, 1) if len(ends) == len(batches) else None,
        "runs": runs,
        "order_violations": violations,
        "source_overlaps": source_overlaps(instance, set(by_source)),
        "lost": sum(c.lost for c in checks),
        "duplicated": sum(c.duplicated for c in checks),
        "unexpected": sum(c.unexpected for c in checks),
        "changed": sum(c.changed for c in checks),
        "snapshot_disagreements": sum(c.snapshot_disagrees for c in checks),
        "latency_s": {
            "p50": round(statistics.median(latencies), 1) if latencies else None,
            "max": round(latencies[-1], 1) if latencies else None,
        },
        "failed_sources": [c.model_dump() for c in checks if not c.ok],
    }


@contextlib.contextmanager
def _moto() -> Iterator[str]:
    from publish_platform.local_s3 import LOCAL_CREDENTIALS, free_port, start_moto_server

    os.environ.update(LOCAL_CREDENTIALS)  # moto's; this is a process of its own
    port = free_port()
    server = start_moto_server(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_load(
    sources: int,
    batches: int,
    dagster_postgres_url: str | None = None,
    timeout: float = 3600,
    keep: Path | None = None,
) -> dict[str, Any]:
    """The whole load on a platform of its own (moto, dagster-daemon and -webserver, SQLite
    catalog; Dagster on Postgres with ``dagster_postgres_url``)."""
    from publish_platform.local_s3 import s3_client
    from publish_platform.runtime import running_platform

    planned = plan_load(sources, batches)
    with contextlib.ExitStack() as stack:
        folder = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-")))
        endpoint = stack.enter_context(_moto())
        platform = stack.enter_context(
            running_platform(folder, endpoint, dagster_postgres_url=dagster_postgres_url)
        )
        s3 = s3_client(endpoint)
        started = time.monotonic()
        land_load(s3, S3Location.parse(platform.landing), planned)
        landing_s = time.monotonic() - started
        state = StateStore(s3, S3Location.parse(platform.env["PUBLISH_PLATFORM_STATE"]))
        report = check_load(
            platform.instance,
            platform.landing,
            state,
            platform.env["PUBLISH_PLATFORM_METASTORE"],
            planned,
            time.time(),
            timeout,
        )
    return {
        **report,
        "landing_s": round(landing_s, 1),
        "dagster_storage": "postgres" if dagster_postgres_url else "sqlite",
        "cpu_count": os.cpu_count(),
    }
