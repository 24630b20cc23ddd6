"""``publish-platform bench``: the platform's diff + plan against a parse floor and a naive
baseline, measured side by side on the same generated batches, plus publish throughput into the
SQLite catalog and the writes of a no-op batch.

Batches are seed-shaped (the seed sample's entity shapes, mostly Columns of about 1.3 KB per
line) and reproducible (a fixed random seed). Version 2 of the source changes, adds and deletes
configurable shares of version 1, and carries new volatile values on every entity; version 3 is
version 1 with only new volatile values (a no-op batch against version 1's snapshot).

Each measurement runs in its own fresh interpreter, so its peak RSS is its own; inputs are files
in a scratch folder (the snapshot of version 1 as the state store holds it: parquet).
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from publish_platform.config import DEFAULT_VOLATILE_ATTRIBUTES, SQL_CHUNK_SIZE
from publish_platform.demo import shared_fixtures

SOURCE = "default/postgres/bench"
COLUMNS_PER_TABLE = 40
TABLES_PER_SCHEMA = 200
PARTITION_KEY = "postgres/bench/run"


# --- generation ------------------------------------------------------------------------------


def _templates() -> dict[str, dict]:
    sample = shared_fixtures() / "seed_sample" / "entities.jsonl"
    found: dict[str, dict] = {}
    for line in sample.read_bytes().splitlines():
        if line.strip():
            entity = orjson.loads(line)
            found.setdefault(entity["typeName"], entity)
    return found


def _ref(type_name: str, qualified_name: str) -> dict:
    return {
        "typeName": type_name,
        "attributes": None,
        "uniqueAttributes": {"qualifiedName": qualified_name},
    }


def generate_entities(count: int, run: str, rng: random.Random) -> Iterator[dict]:
    """``count`` entities of one source: a database, schemas, tables, and mostly columns."""
    templates = _templates()
    stamp = 1_760_000_000_000 + rng.randrange(10**9)
    database = f"{SOURCE}/benchdb"
    produced = 0

    def entity(type_name: str, qualified_name: str, name: str, **extra: Any) -> dict:
        nonlocal produced
        produced += 1
        template = templates[type_name]
        attributes = {
            **template["attributes"],
            "qualifiedName": qualified_name,
            "name": name,
            "connectionQualifiedName": SOURCE,
            "connectionName": "bench",
            "databaseName": "benchdb",
            "databaseQualifiedName": database,
            "lastSyncRun": run,
            "lastSyncRunAt": stamp,
            "lastSyncWorkflowName": f"atlan-postgres-bench-{run}",
            **extra,
        }
        return {**template, "attributes": attributes}

    yield entity("Database", database, "benchdb")
    table_number = 0
    while produced < count:
        schema = f"{database}/schema{table_number // TABLES_PER_SCHEMA}"
        if table_number % TABLES_PER_SCHEMA == 0:
            yield entity(
                "Schema", schema, schema.rsplit("/", 1)[1], database=_ref("Database", database)
            )
        table = f"{schema}/table{table_number}"
        yield entity(
            "Table",
            table,
            f"table{table_number}",
            schemaName=schema.rsplit("/", 1)[1],
            schemaQualifiedName=schema,
            atlanSchema=_ref("Schema", schema),
            columnCount=COLUMNS_PER_TABLE,
        )
        for column in range(COLUMNS_PER_TABLE):
            if produced >= count:
                return
            yield entity(
                "Column",
                f"{table}/col{column}",
                f"col{column}",
                order=column + 1,
                schemaName=schema.rsplit("/", 1)[1],
                schemaQualifiedName=schema,
                tableName=f"table{table_number}",
                tableQualifiedName=table,
                table=_ref("Table", table),
                description=f"column {column} of table{table_number}",
            )
        table_number += 1


def write_versions(folder: Path, count: int, changes: float, seed: int = 7) -> dict[str, int]:
    """v1.jsonl; v2.jsonl: each column changed, deleted or followed by an added column with
    probabilities 60%, 20% and 20% of ``changes``, and new volatile values everywhere; v3.jsonl:
    v1 with only new volatile values. Streamed: memory stays flat whatever ``count`` is."""
    rng = random.Random(seed)
    counts = {"changed": 0, "added": 0, "deleted": 0, "v2_entities": 0}

    def resynced(entity: dict, run: str, at: int, **changed: object) -> bytes:
        attributes = {**entity["attributes"], "lastSyncRun": run, "lastSyncRunAt": at, **changed}
        return orjson.dumps({**entity, "attributes": attributes}) + b"\n"

    with (
        open(folder / "v1.jsonl", "wb") as v1,
        open(folder / "v2.jsonl", "wb") as v2,
        open(folder / "v3.jsonl", "wb") as v3,
    ):
        for index, entity in enumerate(generate_entities(count, "run-1", rng)):
            v1.write(orjson.dumps(entity) + b"\n")
            v3.write(resynced(entity, "run-3", 1_780_000_000_000))
            draw = rng.random() if entity["typeName"] == "Column" else 1.0
            if draw < changes * 0.2:
                counts["deleted"] += 1
                continue
            if draw < changes * 0.8:
                counts["changed"] += 1
                v2.write(
                    resynced(entity, "run-2", 1_770_000_000_000, description=f"changed {index}")
                )
            else:
                v2.write(resynced(entity, "run-2", 1_770_000_000_000))
            counts["v2_entities"] += 1
            if changes * 0.8 <= draw < changes:
                counts["added"] += 1
                counts["v2_entities"] += 1
                qualified_name = entity["attributes"]["tableQualifiedName"] + f"/added{index}"
                v2.write(
                    resynced(
                        entity,
                        "run-2",
                        1_770_000_000_000,
                        qualifiedName=qualified_name,
                        name=f"added{index}",
                    )
                )
    return counts


# --- measurements (each in its own interpreter) ----------------------------------------------


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    phase would be charged with the memory of the process that started it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as data:
        for line in data:
            if line.strip():
                yield line


def measure_parse_floor(folder: Path) -> dict[str, float]:
    """orjson parsing every line of v2, on one core: what any reader of the batch must pay."""
    started = time.perf_counter()
    count = 0
    for line in _lines(folder / "v2.jsonl"):
        orjson.loads(line)
        count += 1
    return {"seconds": time.perf_counter() - started, "lines": count}


def measure_naive(folder: Path) -> dict[str, float]:
    """json.loads, drop volatile keys, json.dumps(sort_keys), md5, Python dict compare."""
    import hashlib

    volatile = set(DEFAULT_VOLATILE_ATTRIBUTES)

    def hashes(path: Path) -> dict[tuple[str, str], str]:
        found = {}
        for line in _lines(path):
            entity = json.loads(line)
            attributes = {k: v for k, v in entity["attributes"].items() if k not in volatile}
            canonical = json.dumps({**entity, "attributes": attributes}, sort_keys=True)
            found[(entity["typeName"], attributes["qualifiedName"])] = hashlib.md5(  # noqa: S324
                canonical.encode()
            ).hexdigest()
        return found

    before = hashes(folder / "v1.jsonl")  # the stored state: not timed
    started = time.perf_counter()
    after = hashes(folder / "v2.jsonl")
    creates = sum(1 for k in after if k not in before)
    updates = sum(1 for k, h in after.items() if k in before and before[k] != h)
    deletes = sum(1 for k in before if k not in after)
    return {
        "seconds": time.perf_counter() - started,
        "creates": creates,
        "updates": updates,
        "deletes": deletes,
    }


def _pieces(path: Path, size: int = 8 << 20) -> Iterator[bytes]:
    """The file in pieces, as an S3 body streams it: never held whole."""
    with open(path, "rb") as data:
        while piece := data.read(size):
            yield piece


def _diff_step(folder: Path, version: str, view: Any, scratch: Path) -> tuple[Any, Path]:
    """What the diff step computes for a batch (imports are done by the caller): as in the
    step, the entity JSON is spilled while the batch is parsed and diffed, then streamed into
    the diff's file (local here, where the step uploads it). Returns the diff's summary, as the
    step stores it for the plan step, and the file."""
    from publish_platform.diff import diff_batch, recognisable
    from publish_platform.entities import parse_files
    from publish_platform.pipeline import DiffSummary, summarize_diff
    from publish_platform.state import frame_parquet

    parsed = parse_files(
        [(f"{version}.jsonl", _pieces(folder / f"{version}.jsonl"))],
        DEFAULT_VOLATILE_ATTRIBUTES,
        known_raw=recognisable(view),  # for the parse only, as in the diff step
        spill=scratch / "entities",
    )
    diff = diff_batch(parsed, view, SOURCE, "full")
    del parsed  # as the step does before it writes the diff
    summary = DiffSummary(partition_key=PARTITION_KEY, outcome="diffed", source=SOURCE)
    summarize_diff(summary, diff, base_serial=1)
    assert not diff.issues, diff.issues[:3]
    stored = scratch / "diff.parquet"
    frame_parquet(diff.stored_changes(scratch / "diff-parts"), stored)
    return summary, stored


def _plan_step(summary: Any, stored: Path, view: Any, scratch: Path) -> Any:
    """The plan step's work on the diff's file (the pipeline's own, after its download),
    against the snapshot ``view``, with the default deletion threshold and no approval; a
    plan that its checks would hold fails the benchmark. Returns what it planned: the plan,
    its file in ``scratch``, and the seconds its checks took."""
    from publish_platform.config import Settings
    from publish_platform.pipeline import plan_diff
    from publish_platform.plan import blocking_failures

    threshold = Settings.model_fields["deletion_threshold"].default
    planned = plan_diff(summary, stored, view, threshold, None, None, scratch)
    held = [check.description for check in blocking_failures(planned.checks)]
    assert not held, held
    return planned


def _diff_plan(folder: Path, version: str, snapshot: Any) -> tuple[Any, Path, float, float]:
    """The diff and plan steps of a batch, one after the other in this process: ``snapshot``
    is a snapshot file, as the diff step reads it, or a frame. Returns the plan's header, its
    file, the diff step's peak RSS, and the seconds the plan's checks took."""
    import tempfile

    from publish_platform.diff import SnapshotView

    with tempfile.TemporaryDirectory(prefix="bench-diff-plan-", dir=folder) as scratch:
        view = SnapshotView(snapshot)
        summary, stored = _diff_step(folder, version, view, Path(scratch))
        diff_step_peak_mb = _peak_rss_mb()  # the diff step's own peak: its process ends here
        planned = _plan_step(summary, stored, view, Path(scratch))
        kept = planned.operations.replace(folder / f"planned-{version}.parquet")
        return planned.plan.header, kept, diff_step_peak_mb, planned.checks_s


PREPARE_LINES = 500_000  # v1 becomes its snapshot this many lines at a time


def prepare_snapshot(folder: Path) -> dict[str, float]:
    """v1 as its first publish leaves it (not timed): the snapshot, as the state store holds it
    (every entity with its guid), and the plan of creates that the publish phase applies. Built
    a part at a time, then streamed into one file: 5M entities at once would take 20 GB."""
    import itertools

    import polars as pl

    from publish_platform.entities import parse_files
    from publish_platform.metastores.sql import new_guid
    from publish_platform.plan import PLAN_SCHEMA
    from publish_platform.state import ROW_GROUP_ROWS, SNAPSHOT_SCHEMA, snapshot_parquet

    parts = folder / "v1-parts"
    parts.mkdir(exist_ok=True)
    with open(folder / "v1.jsonl", "rb") as v1:
        for number in itertools.count():
            lines = list(itertools.islice(v1, PREPARE_LINES))
            if not lines:
                break
            parsed = parse_files([("v1.jsonl", b"".join(lines))], DEFAULT_VOLATILE_ATTRIBUTES)
            assert not parsed.issues, parsed.issues[:3]
            parsed.frame.with_columns(
                guid=pl.Series([new_guid() for _ in range(parsed.frame.height)])
            ).select(*SNAPSHOT_SCHEMA, "missing").write_parquet(parts / f"{number:05d}.parquet")
    published = pl.scan_parquet(parts / "*.parquet")
    snapshot_parquet(published.drop("missing"), folder / "snapshot-v1.parquet")
    # In file order, which is parents first: each table before its columns.
    published.with_row_index("seq").with_columns(
        pl.col("seq").cast(pl.Int64), op=pl.lit("create"), guid=pl.lit(None, pl.String)
    ).select(list(PLAN_SCHEMA)).sink_parquet(
        folder / "plan-v1.parquet",
        row_group_size=ROW_GROUP_ROWS,  # as a stored plan's
    )
    for part in parts.iterdir():
        part.unlink()
    parts.rmdir()
    return {
        "entities": pl.scan_parquet(folder / "snapshot-v1.parquet")
        .select(pl.len())
        .collect()
        .item()
    }


def measure_diff_plan(folder: Path) -> dict[str, float]:
    """Diff and plan of v2 against the snapshot file of v1, reading the snapshot included (as
    the diff step does: its indexes, then the rows the batch touches)."""
    import publish_platform.diff
    import publish_platform.entities
    import publish_platform.plan  # noqa: F401 - imported before the clock starts

    started = time.perf_counter()
    header, planned, diff_step_peak_mb, checks_s = _diff_plan(
        folder, "v2", folder / "snapshot-v1.parquet"
    )
    planned.unlink()
    return {
        # Diff and plan; the plan's checks (asset checks, beyond what the baseline does) apart.
        "seconds": time.perf_counter() - started - checks_s,
        "checks_seconds": checks_s,
        "diff_step_peak_rss_mb": diff_step_peak_mb,
        "creates": header.creates,
        "updates": header.updates,
        "deletes": header.deletes,
        "operations": header.operations,
    }


# A batch as the platform runs it: the diff step, then the plan step in a process of its own,
# which gets the diff's file and its summary. A source's first batch (v1, no snapshot), and a
# later one (v2 against v1's snapshot): each step's peak is its own.
STEP_DIFF = "{batch}-diff.parquet"
STEP_DIFF_SUMMARY = "{batch}-diff.json"


def _step_view(folder: Path, batch: str) -> Any:
    from publish_platform.diff import SnapshotView
    from publish_platform.state import empty_snapshot

    if batch == "first":
        return SnapshotView(empty_snapshot())
    return SnapshotView(folder / "snapshot-v1.parquet")


def measure_diff_step(folder: Path, batch: str) -> dict[str, float]:
    """The diff step of ``batch``: "first" (v1 against no snapshot: every line parsed, its JSON
    spilled) or "later" (v2 against v1's snapshot)."""
    import tempfile

    import publish_platform.entities  # noqa: F401 - imported before the clock starts

    started = time.perf_counter()
    version = "v1" if batch == "first" else "v2"
    with tempfile.TemporaryDirectory(prefix=f"bench-{batch}-diff-", dir=folder) as scratch:
        summary, stored = _diff_step(folder, version, _step_view(folder, batch), Path(scratch))
        stored.replace(folder / STEP_DIFF.format(batch=batch))
    (folder / STEP_DIFF_SUMMARY.format(batch=batch)).write_text(summary.model_dump_json())
    return {"seconds": time.perf_counter() - started}


def measure_plan_step(folder: Path, batch: str) -> dict[str, float]:
    """The plan step of that batch, from the diff's file, in a process of its own."""
    import tempfile

    import publish_platform.plan  # noqa: F401 - imported before the clock starts
    from publish_platform.pipeline import DiffSummary

    started = time.perf_counter()
    diff_file = folder / STEP_DIFF.format(batch=batch)
    summary_file = folder / STEP_DIFF_SUMMARY.format(batch=batch)
    summary = DiffSummary.model_validate_json(summary_file.read_text())
    with tempfile.TemporaryDirectory(prefix=f"bench-{batch}-plan-", dir=folder) as scratch:
        planned = _plan_step(summary, diff_file, _step_view(folder, batch), Path(scratch))
    for done in (diff_file, summary_file):
        done.unlink()
    header = planned.plan.header
    if batch == "first":
        # v1's lines are valid and distinct: its first plan creates each, or something was lost.
        assert header.creates == header.operations == summary.lines, (header, summary.lines)
    return {
        "seconds": time.perf_counter() - started - planned.checks_s,
        "checks_seconds": planned.checks_s,
        "creates": header.creates,
        "updates": header.updates,
        "deletes": header.deletes,
        "operations": header.operations,
    }


def measure_publish(folder: Path) -> dict[str, float]:
    """The first publish of v1 (every entity created) into a fresh SQLite catalog, as the
    publish step runs it: the plan streamed from its file, then the next snapshot streamed to
    one. Then the no-op batch v3 against it: its plan's writes and the catalog's write
    counters."""
    import shutil

    import polars as pl

    from publish_platform.metastores.sql import SqlCatalog
    from publish_platform.publish import execute_plan, next_snapshot
    from publish_platform.state import empty_snapshot, snapshot_parquet

    operations = pl.scan_parquet(folder / "plan-v1.parquet")
    # A kept folder may hold the catalog of an earlier run: publishing into it would update
    # every entity, not create it.
    database = folder / "catalog.sqlite"
    for stale in (database, *folder.glob("catalog.sqlite-*")):
        stale.unlink(missing_ok=True)
    catalog = SqlCatalog(f"sqlite:///{database}")
    try:
        started = time.perf_counter()
        # Its results written to files, as the publish step does.
        outcome = execute_plan(
            operations,
            catalog,
            chunk_size=SQL_CHUNK_SIZE,
            source=SOURCE,
            spill=folder / "publish-results",
        )
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        published = folder / "snapshot-published.parquet"
        snapshot_parquet(next_snapshot(empty_snapshot(), operations, outcome.results), published)
        snapshot_s = time.perf_counter() - started
        peak_rss_mb = _peak_rss_mb()  # of the publish alone: the no-op batch's diff comes next
        published.unlink()
        succeeded = outcome.succeeded
        shutil.rmtree(folder / "publish-results")
        before = sum(catalog.versions().values())
        noop, planned, _, _ = _diff_plan(folder, "v3", folder / "snapshot-v1.parquet")
        execute_plan(pl.scan_parquet(planned), catalog, chunk_size=SQL_CHUNK_SIZE, source=SOURCE)
        planned.unlink()
        writes = sum(catalog.versions().values()) - before
    finally:
        catalog.close()
    return {
        "seconds": seconds,
        "snapshot_s": snapshot_s,
        "publish_peak_rss_mb": peak_rss_mb,
        "published": succeeded,
        "entities_per_s": succeeded / seconds if seconds else 0.0,
        "noop_operations": noop.operations,
        "noop_writes": writes,
    }


# --- landing: a sensor tick over a long history, and landed → COMPLETE with the daemon ---------


def _land(s3: Any, landing: Any, run: Any, source: str) -> None:
    """A small finished run of ``source``: one database entity, its sidecar and manifest."""
    from publish_platform.demo import manifest_for, run_files
    from publish_platform.local_s3 import put_files

    database = {
        "typeName": "Database",
        "attributes": {
            "qualifiedName": f"{source}/db",
            "name": "db",
            "connectionQualifiedName": source,
        },
    }
    manifest = manifest_for(source, run.workflow_id, run.run_id)
    put_files(
        s3, landing.bucket, run.prefix(landing), run_files({"database": [database]}, manifest)
    )


def measure_sensor_tick(old_runs: int, new_runs: int = 10) -> dict[str, float]:
    """One discovery pass (what the landing sensor does per tick) over ``old_runs`` processed
    run folders and ``new_runs`` new ones, against a moto server: seconds and S3 LIST calls,
    for a full listing and for a tick driven by the landing queue's notifications."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from publish_platform.config import S3Location
    from publish_platform.landing import RunRef, acknowledge, discover, receive_landing_events
    from publish_platform.local_s3 import (
        LOCAL_CREDENTIALS,
        free_port,
        notify_landing_queue,
        s3_client,
        start_moto_server,
    )

    os.environ.update(LOCAL_CREDENTIALS)  # moto's; this is a bench process of its own
    port = free_port()
    server = start_moto_server(port)
    try:
        s3 = s3_client(f"http://127.0.0.1:{port}")
        landing = S3Location.parse("s3://bench-landing/runs/")
        s3.create_bucket(Bucket=landing.bucket)
        old = [RunRef("postgres", f"wf{n % 50}", str(uuid.UUID(int=n))) for n in range(old_runs)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda run: _land(s3, landing, run, SOURCE), old))
        known = {run.partition_key for run in old}
        queue_url = notify_landing_queue(s3, landing.bucket, "bench-landing-events")
        new = [RunRef("postgres", "wf-new", str(uuid.uuid4())) for _ in range(new_runs)]
        for run in new:
            _land(s3, landing, run, SOURCE)
        # One entry per LIST call, appended by the discovery's listing threads (an append is
        # atomic; a += of a count is not).
        calls: list[str] = []
        s3.meta.events.register(
            "before-call.s3.ListObjectsV2", lambda **_: calls.append("ListObjectsV2")
        )
        started = time.perf_counter()
        listed = discover(s3, landing, known, settle_seconds=0)
        listing_s = time.perf_counter() - started
        listing_calls = len(calls)
        calls.clear()

        sqs = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{port}")
        started = time.perf_counter()
        events = receive_landing_events(sqs, queue_url, landing)
        notified = discover(s3, landing, known, 0, runs=list(events.runs.values()))
        acknowledge(sqs, queue_url, events.receipts)
        events_s = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "seconds": listing_s,
        "old_runs": old_runs,
        "new_runs": len(listed.ready),
        "list_calls": listing_calls,
        "deep_listings": listed.deep_listings,
        "events_seconds": events_s,
        "events_new_runs": len(notified.ready),
        "events_list_calls": len(calls),
        "events_sqs_receive_calls": events.receive_calls,
        "events_messages": len(events.receipts),
    }


def measure_latency(batches: int) -> dict[str, float]:
    """Small batches landed one after another into a running platform (moto, dagster-daemon,
    dagster-webserver on SQLite, default sensor interval): landed → COMPLETE for each."""
    import uuid

    from publish_platform.config import S3Location, Settings
    from publish_platform.landing import RunRef
    from publish_platform.local_s3 import LOCAL_CREDENTIALS, free_port, s3_client, start_moto_server
    from publish_platform.publish_state import PublishStatus
    from publish_platform.runtime import running_platform, wait_for_state

    interval = str(Settings.model_fields["sensor_interval_seconds"].default)
    os.environ.update(LOCAL_CREDENTIALS)  # moto's; this is a bench process of its own
    port = free_port()
    moto = start_moto_server(port)
    latencies = []
    try:
        endpoint = f"http://127.0.0.1:{port}"
        extra = {"PUBLISH_PLATFORM_SENSOR_INTERVAL_SECONDS": interval}
        with (
            tempfile.TemporaryDirectory(prefix="publish-latency-") as scratch,
            running_platform(Path(scratch), endpoint, extra_env=extra) as platform,
        ):
            s3 = s3_client(endpoint)
            landing = S3Location.parse(platform.landing)
            for number in range(batches):
                run = RunRef("postgres", "latency", str(uuid.uuid4()))
                _land(s3, landing, run, f"{SOURCE}-{number}")
                landed = time.monotonic()
                state = wait_for_state(
                    platform.instance, platform.landing, run.partition_key, poll_s=0.25
                )
                if state.status != PublishStatus.COMPLETE:
                    raise RuntimeError(f"{run.partition_key} ended {state.status}, not COMPLETE")
                latencies.append(time.monotonic() - landed)
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    ordered = sorted(latencies)
    return {
        "batches": batches,
        "p50_s": ordered[len(ordered) // 2],
        "max_s": ordered[-1],
        "sensor_interval_s": float(interval),
    }


PHASES = {
    "prepare": prepare_snapshot,
    "parse_floor": measure_parse_floor,
    "naive": measure_naive,
    "diff_plan": measure_diff_plan,
    # Measured once, for their time and memory: not compared with a baseline.
    "first_diff": lambda folder: measure_diff_step(folder, "first"),
    "first_plan": lambda folder: measure_plan_step(folder, "first"),
    "later_diff": lambda folder: measure_diff_step(folder, "later"),
    "later_plan": lambda folder: measure_plan_step(folder, "later"),
    "publish": measure_publish,
    "sensor_tick": lambda arg: measure_sensor_tick(int(str(arg))),
    "latency": lambda arg: measure_latency(int(str(arg))),
}


def _run_phase(name: str, folder: Path) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-m", "publish_platform.bench", name, str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"bench phase {name} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_bench(
    entities: int,
    changes: float,
    seed: int = 7,
    keep: Path | None = None,
    sensor_runs: int = 0,
    latency_batches: int = 0,
    rounds: int = 3,
) -> dict:
    """All measurements on one set of generated batches; the JSON the bench command prints.

    The parse floor, the naive baseline and diff + plan are measured ``rounds`` times, one after
    the other in each round, and compared by their medians: on a shared machine a slow spell
    then slows a round of all three, not one of them."""
    with tempfile.TemporaryDirectory(prefix="publish-bench-") as scratch:
        folder = keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        shares = write_versions(folder, entities, changes, seed)
        generate_s = time.perf_counter() - started
        _run_phase("prepare", folder)
        runs: dict[str, list[dict[str, float]]] = {"parse_floor": [], "naive": [], "diff_plan": []}
        for _ in range(max(1, rounds)):
            for phase, measured in runs.items():
                measured.append(_run_phase(phase, folder))
        floor, naive, platform = (_median_run(runs[phase]) for phase in runs)
        first_diff = _run_phase("first_diff", folder)
        first_plan = _run_phase("first_plan", folder)
        later_diff = _run_phase("later_diff", folder)
        later_plan = _run_phase("later_plan", folder)
        counts = ("creates", "updates", "deletes", "operations")
        # The same plan as the rounds', step by step.
        assert [later_plan[k] for k in counts] == [platform[k] for k in counts], later_plan
        publish = _run_phase("publish", folder)
        v2_bytes = (folder / "v2.jsonl").stat().st_size
    return {
        "entities": entities,
        "v2_entities": shares["v2_entities"],
        "v2_mb": round(v2_bytes / 2**20, 1),
        "changes": {k: shares[k] for k in ("changed", "added", "deleted")},
        "generate_s": round(generate_s, 3),
        "parse_floor_s": round(floor["seconds"], 3),
        "naive_s": round(naive["seconds"], 3),
        "diff_plan_s": round(platform["seconds"], 3),
        "plan_checks_s": round(platform["checks_seconds"], 3),
        "ratio_vs_parse_floor": round(platform["seconds"] / floor["seconds"], 3),
        "speedup_vs_naive": round(naive["seconds"] / platform["seconds"], 3),
        "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs["diff_plan"]), 1),
        "parse_floor_peak_rss_mb": round(floor["peak_rss_mb"], 1),
        "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
        "rounds_s": {
            phase: [round(run["seconds"], 3) for run in measured]
            for phase, measured in runs.items()
        },
        "plan": {k: platform[k] for k in ("creates", "updates", "deletes", "operations")},
        "naive_found": {k: naive[k] for k in ("creates", "updates", "deletes")},
        # A source's first batch (no snapshot yet): every line parsed, its JSON spilled.
        "first_diff_plan_s": round(first_diff["seconds"] + first_plan["seconds"], 3),
        "first_plan_checks_s": round(first_plan["checks_seconds"], 3),
        "first_diff_step_peak_rss_mb": round(first_diff["peak_rss_mb"], 1),
        "first_plan_step_peak_rss_mb": round(first_plan["peak_rss_mb"], 1),
        # v2's diff and plan steps, each in a process of its own as in the platform (the rounds
        # above run both in one process, the plan reading the rows the diff kept).
        "diff_step_peak_rss_mb": round(later_diff["peak_rss_mb"], 1),
        "plan_step_peak_rss_mb": round(later_plan["peak_rss_mb"], 1),
        "publish_entities_per_s": round(publish["entities_per_s"], 1),
        "publish_s": round(publish["seconds"], 3),
        "publish_snapshot_s": round(publish["snapshot_s"], 3),
        # The first publish: plan streamed in, executed, next snapshot streamed out.
        "publish_peak_rss_mb": round(publish["publish_peak_rss_mb"], 1),
        "noop_operations": publish["noop_operations"],
        "noop_writes": publish["noop_writes"],
        "cpu_count": os.cpu_count(),
        **_landing_measurements(sensor_runs, latency_batches),
    }


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run of median time (the upper one of an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]


def _landing_measurements(sensor_runs: int, latency_batches: int) -> dict[str, object]:
    found: dict[str, object] = {}
    if sensor_runs:
        tick = _run_phase("sensor_tick", Path(str(sensor_runs)))
        found["sensor_tick"] = {k: v for k, v in tick.items() if k != "peak_rss_mb"}
    if latency_batches:
        latency = _run_phase("latency", Path(str(latency_batches)))
        found["landed_to_complete"] = {k: v for k, v in latency.items() if k != "peak_rss_mb"}
    return found


if __name__ == "__main__":
    phase, where = sys.argv[1], Path(sys.argv[2])
    measured = PHASES[phase](where)
    measured["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(measured))
