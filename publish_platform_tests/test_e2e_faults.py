"""Faults against real parts, and load, on one running platform as production runs it: Dagster
storage in Postgres (dagster-postgres), the catalog in a Postgres of its own, dagster-daemon and
dagster-webserver, and S3 through a fault-injecting proxy in front of the moto server.

Every fault ends the same way: the batch is COMPLETE, or dead-lettered with a reason, and
``verify_source`` finds nothing lost, nothing duplicated, and the source's snapshot and the
catalog in agreement (identities and content hashes) with the batch published last.

- S3: read errors (503 SlowDown within boto3's retries; 403 for good → dead letter, then requeue),
  a data file's connection broken in the middle of its body (tier 2),
  write errors beyond boto3's retries (tier 2), connection resets, a conditional write whose
  answer was lost, slowness, failing listings under the landing sensor.
- The catalog's Postgres restarted in the middle of a publish (tiers 1 and 2, resume).
- kill -9 of the run worker in diff, in plan and in publish (three sources at once).
- Load: many sources' batches landing together, with the daemon stopped while runs are queued
  and started again; all drain, in source-timestamp order per source.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

from publish_platform.config import S3Location
from publish_platform.dead_letters import DeadLetterQueue
from publish_platform.defs.failures import retry_history
from publish_platform.defs.monitoring import worker_started
from publish_platform.landing import RunRef
from publish_platform.load import (
    LoadBatch,
    check_load,
    extraction,
    land_load,
    plan_load,
    verify_source,
)
from publish_platform.local_s3 import s3_client
from publish_platform.publish_state import PublishState, PublishStatus
from publish_platform.runtime import RunningPlatform, running_platform, wait_for_state
from publish_platform.state import StateStore
from publish_platform_tests.commands import run_cli
from publish_platform_tests.postgres import LocalPostgres, started_postgres
from publish_platform_tests.s3_faults import FaultProxy, fault_proxy

pytestmark = pytest.mark.slow

PLATFORM_ENV = {
    # Tier 2 waits about 0.5-1.5, 2.5-3.5 and 6.5-7.5 s: a catalog restart fits in them.
    "PUBLISH_PLATFORM_RETRY_DELAY_SCALE": "0.1",
    # A batch whose run fails for good is dead-lettered at once (tier 3 is test_e2e_retries').
    "PUBLISH_PLATFORM_SCHEDULED_RELAUNCHES": "0",
    "PUBLISH_PLATFORM_CHUNK_SIZE": "50",
}
DATA_FILE = "transformed/entities/entities.json"  # what load.land_load writes per batch
FINAL = {
    PublishStatus.COMPLETE,
    PublishStatus.DEAD_LETTERED,
    PublishStatus.HELD,
    PublishStatus.QUARANTINED,
    PublishStatus.SKIPPED,
    PublishStatus.SUPERSEDED,
}


@dataclass
class FaultyPlatform:
    platform: RunningPlatform
    proxy: FaultProxy
    catalog: LocalPostgres
    catalog_url: str
    s3: Any  # straight to moto, past the proxy: the test's own reads and writes
    landing: S3Location
    state: StateStore  # straight to moto

    def dead_letters(self) -> dict[str, str]:
        return {e.partition_key: e.last_run_id or "" for e in DeadLetterQueue(self.state).list()}

    def settle(self, batch: LoadBatch, timeout: float = 300) -> PublishState:
        return wait_for_state(
            self.platform.instance,
            self.platform.landing,
            batch.run.partition_key,
            FINAL,
            timeout=timeout,
            dead_letters=self.dead_letters,
        )

    def verify(self, batch: LoadBatch, published: bool = True) -> None:
        """Nothing lost or duplicated; snapshot and catalog agree with the batch (or are empty)."""
        check = verify_source(
            self.state, self.catalog_url, batch.source, batch.entities if published else []
        )
        assert check.ok, check


@pytest.fixture(scope="module")
def catalog_server() -> Iterator[LocalPostgres]:
    """The catalog's own Postgres, which the tests restart."""
    yield from started_postgres()


@pytest.fixture(scope="module")
def faulty(
    tmp_path_factory: pytest.TempPathFactory,
    moto_endpoint: str,
    postgres_server: LocalPostgres,
    catalog_server: LocalPostgres,
) -> Iterator[FaultyPlatform]:
    dagster_url = postgres_server.create_database(f"dagster_{uuid.uuid4().hex[:8]}")
    catalog_url = catalog_server.create_database("catalog", replace=True)
    folder = tmp_path_factory.mktemp("faulty")
    with (
        fault_proxy(moto_endpoint) as proxy,
        running_platform(folder, proxy.url, catalog_url, dagster_url, PLATFORM_ENV) as platform,
    ):
        s3 = s3_client(moto_endpoint)
        state = StateStore(s3, S3Location.parse(platform.env["PUBLISH_PLATFORM_STATE"]))
        landing = S3Location.parse(platform.landing)
        yield FaultyPlatform(platform, proxy, catalog_server, catalog_url, s3, landing, state)


def batch_for(name: str, minutes_ago: int, tables: int = 4, columns: int = 3) -> LoadBatch:
    """The first extraction of a source of its own (2 + tables × (1 + columns) entities); older
    data runs first (the queue's priority is the data's age in minutes)."""
    source = f"default/faults/{name}"
    run = RunRef("faults", name, str(uuid.uuid4()))
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return LoadBatch(run, source, 0, at, extraction(source, 0, run.run_id, at, tables, columns))


def exactly(bucket: str, key: str) -> str:
    """A proxy pattern for one object (any query string)."""
    return "^" + re.escape(f"/{bucket}/{key}") + r"(\?|$)"


def below(bucket: str, prefix: str) -> str:
    return "^" + re.escape(f"/{bucket}/{prefix}")


def runs_of(platform: RunningPlatform, key: str) -> list[Any]:
    records = platform.instance.get_run_records(RunsFilter(tags={"dagster/partition": key}))
    return sorted(records, key=lambda r: r.create_timestamp)


def step_events(platform: RunningPlatform, run_id: str) -> list[tuple[str, str]]:
    """(event type, step) of a run's step events, in order."""
    kinds = {
        DagsterEventType.STEP_START,
        DagsterEventType.STEP_SUCCESS,
        DagsterEventType.STEP_FAILURE,
        DagsterEventType.STEP_UP_FOR_RETRY,
    }
    records = platform.instance.get_records_for_run(run_id, of_type=kinds).records
    return [
        (r.event_log_entry.dagster_event.event_type_value, r.event_log_entry.step_key)
        for r in records
    ]


def failed_ticks(platform: RunningPlatform, sensor: str) -> list[str]:
    """Errors of a sensor's failed ticks, with their causes."""
    from dagster._core.scheduler.instigation import InstigatorType, TickStatus

    instance = platform.instance
    return [
        tick.error.to_string() if tick.error else ""
        for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        if state.name == sensor
        for tick in instance.get_ticks(
            state.instigator_origin_id, state.selector_id, statuses=[TickStatus.FAILURE]
        )
    ]


def kill_worker(platform: RunningPlatform, key: str) -> tuple[str, str]:
    """kill -9 the worker of the batch's running run: (its run id, the step it was in)."""
    deadline = time.monotonic() + 60
    while True:
        started = [
            r for r in runs_of(platform, key) if r.dagster_run.status == DagsterRunStatus.STARTED
        ]
        worker = started and worker_started(platform.instance, started[-1].dagster_run.run_id)
        if worker:
            break
        assert time.monotonic() < deadline, f"no running worker for {key}"
        time.sleep(0.2)
    run_id = started[-1].dagster_run.run_id
    events = step_events(platform, run_id)
    done = {step for kind, step in events if kind == "STEP_SUCCESS"}
    in_progress = [step for kind, step in events if kind == "STEP_START" and step not in done]
    os.kill(worker[0], signal.SIGKILL)
    return run_id, in_progress[-1] if in_progress else ""


def test_s3_and_catalog_faults_and_kill_9_in_each_step(faulty: FaultyPlatform) -> None:
    platform, proxy, state = faulty.platform, faulty.proxy, faulty.state
    # Longest chains first: the dead letter and its requeue, then the kills and the restart.
    names = ["denied", "kill-diff", "kill-plan", "kill-publish", "catalog-restart", "s3-transient"]
    big = {"kill-publish", "catalog-restart"}  # 202 entities: 5 chunks of 50
    batch = {
        name: batch_for(name, 20 - n, *((10, 19) if name in big else ()))
        for n, name in enumerate(names)
    }
    landing, state_bucket = faulty.landing, state.location.bucket

    def data(name: str) -> str:
        return below(landing.bucket, batch[name].run.prefix(landing) + "transformed/")

    def stored(name: str, file: str) -> str:
        return exactly(state_bucket, state.batch_key(batch[name].run.partition_key, file))

    def checkpoints(name: str) -> str:
        return below(state_bucket, state.batch_key(batch[name].run.partition_key, "publish/"))

    transient = batch["s3-transient"]
    # One batch meets every transient S3 fault; the first matching rule acts on a request.
    faults = {
        # read errors within boto3's own retries (6 attempts in all)
        "read": proxy.add(data("s3-transient"), "error", "GET", times=2),
        # the data file's connection broken mid-body: the diff step fails and tier 2 retries it
        "cut": proxy.add(
            exactly(landing.bucket, transient.run.prefix(landing) + DATA_FILE), "cut", "GET"
        ),
        # write errors beyond them: the step fails and tier 2 retries it
        "write": proxy.add(
            stored("s3-transient", "plan.parquet"),
            "error",
            "PUT",
            status=500,
            code="InternalError",
            times=6,
        ),
        # connections reset before the request reached S3
        "reset": proxy.add(checkpoints("s3-transient"), "reset", "PUT", times=2),
        # the pointer's conditional write applied, its answer lost; boto3's retry gets a 412
        "lost": proxy.add(
            exactly(state_bucket, state.source_key(transient.source, "pointer.json")), "lost", "PUT"
        ),
        # slowness: every other request of the batch waits
        "slow": proxy.add(
            "|".join(
                map(re.escape, [transient.run.run_id, state.source_key(transient.source, "")])
            ),
            "delay",
            seconds=0.3,
            times=None,
        ),
        # the landing sensor's listing refused once: that tick fails, the next one finds them
        "listing": proxy.add(
            rf"^/{landing.bucket}\?(?=.*list-type=2)(?=.*delimiter=/)",
            "error",
            "GET",
            status=403,
            code="AccessDenied",
        ),
        # a read refused for good: dead letter
        "denied": proxy.add(
            data("denied"), "error", "GET", status=403, code="AccessDenied", times=None
        ),
        "kill-diff": proxy.add(data("kill-diff"), "hold", "GET"),
        "kill-plan": proxy.add(stored("kill-plan", "plan.parquet"), "hold", "PUT"),
        "kill-publish": proxy.add(checkpoints("kill-publish"), "hold", "PUT", skip=2),
        "catalog-restart": proxy.add(checkpoints("catalog-restart"), "hold", "PUT", skip=1),
    }
    land_load(faulty.s3, landing, list(batch.values()))

    # Act while the held requests wait: kill the worker that sent one, or restart the catalog.
    killed: dict[str, tuple[str, str]] = {}
    pending = ["kill-diff", "kill-plan", "kill-publish", "catalog-restart"]
    deadline = time.monotonic() + 240
    while pending:
        assert time.monotonic() < deadline, f"never held: {pending}"
        for name in [n for n in pending if faults[n].hit.is_set()]:
            if name == "catalog-restart":
                faulty.catalog.stop()
                faults[name].release()  # the worker goes on to a catalog that is down
                time.sleep(1.0)
                faulty.catalog.start()
            else:
                killed[name] = kill_worker(platform, batch[name].run.partition_key)
                faults[name].release(forward=False)
            pending.remove(name)
        time.sleep(0.2)

    states = {name: faulty.settle(batch[name]) for name in names}
    for name, found in states.items():
        expected = PublishStatus.DEAD_LETTERED if name == "denied" else PublishStatus.COMPLETE
        assert found.status == expected, (name, found.model_dump_json(indent=1))
        faulty.verify(batch[name], published=found.status == PublishStatus.COMPLETE)

    hits = {name: fault.hits for name, fault in faults.items()}
    assert hits["read"] == 2 and hits["cut"] == 1, hits
    assert hits["write"] == 6 and hits["reset"] == 2, hits
    assert hits["lost"] == 1 and hits["slow"] > 10 and hits["listing"] == 1, hits
    assert any("ListObjectsV2" in error for error in failed_ticks(platform, "landing_sensor"))
    absorbed = states["s3-transient"]
    events = step_events(platform, absorbed.dagster_run_id)
    assert ("STEP_UP_FOR_RETRY", "diff") in events, events  # the cut read, by tier 2
    assert ("STEP_UP_FOR_RETRY", "plan") in events, events  # the write errors, by tier 2
    # The lost answer was recognised as the pointer's own commit: no retry, counted right.
    history = retry_history(platform.instance, transient.run.partition_key)
    assert not [a for a in history if "moved during publish" in a.error], history
    assert absorbed.metrics.published == len(transient.entities)

    for name, step in (("kill-diff", "diff"), ("kill-plan", "plan"), ("kill-publish", "publish")):
        run_id, in_step = killed[name]
        assert in_step == step, (name, in_step)
        assert platform.instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
        retry = platform.instance.get_run_by_id(states[name].dagster_run_id)
        assert retry.tags.get("dagster/parent_run_id") == run_id, name  # Dagster's run retry
    assert states["kill-publish"].metrics.resumed > 0  # from its checkpoints, not from zero

    restarted = batch["catalog-restart"].run.partition_key
    tiers = {attempt.tier for attempt in retry_history(platform.instance, restarted)}
    assert "delayed" in tiers, tiers
    assert states["catalog-restart"].metrics.resumed > 0

    # The dead letter says why; once S3 lets the platform read the data, requeue completes it.
    key = batch["denied"].run.partition_key
    entry = DeadLetterQueue(state).get(key)
    assert entry is not None and "AccessDenied" in entry.reason, entry
    assert [a.tier for a in entry.history] == ["delayed"] * 3 + ["initial"], entry.history
    proxy.remove(faults["denied"])
    run_cli("dlq", "requeue", key, env=platform.env)
    assert faulty.settle(batch["denied"]).status == PublishStatus.COMPLETE
    faulty.verify(batch["denied"])


SOURCES, PER_SOURCE = 4, 2  # and a third batch of one source, landed while the daemon is down


def test_load_drains_in_order_through_a_daemon_restart_with_runs_queued(
    faulty: FaultyPlatform,
) -> None:
    platform, processes = faulty.platform, faulty.platform.processes
    assert processes is not None
    faulty.proxy.clear()
    batches = plan_load(SOURCES, SOURCES * PER_SOURCE)
    keys = {b.run.partition_key for b in batches}
    land_load(faulty.s3, faulty.landing, batches)
    landed = time.time()

    def runs(status: DagsterRunStatus) -> set[str]:
        found = platform.instance.get_run_records(RunsFilter(statuses=[status]))
        return {
            r.dagster_run.run_id
            for r in found
            if r.dagster_run.tags.get("dagster/partition") in keys
        }

    # Stop the daemon with runs going and more waiting in the queue behind them.
    deadline = time.monotonic() + 180
    while not (runs(DagsterRunStatus.STARTED) and len(runs(DagsterRunStatus.QUEUED)) >= 3):
        assert time.monotonic() < deadline, "runs never queued up"
        time.sleep(0.2)
    processes.stop_daemon()
    waiting = runs(DagsterRunStatus.QUEUED)
    in_flight = runs(DagsterRunStatus.STARTED)
    # A newer batch of one source lands while the daemon is down: found after the restart.
    first = batches[0]
    run = RunRef(first.run.app, first.run.workflow_id, str(uuid.uuid4()))
    at = first.source_timestamp + timedelta(minutes=PER_SOURCE)
    late = LoadBatch(
        run, first.source, PER_SOURCE, at, extraction(first.source, PER_SOURCE, run.run_id, at)
    )
    land_load(faulty.s3, faulty.landing, [late])
    time.sleep(5)
    assert runs(DagsterRunStatus.QUEUED) == waiting  # nothing dequeued while it was down
    assert late.run.partition_key not in platform.instance.get_dynamic_partitions("workflow_runs")
    processes.start_daemon()

    report = check_load(
        platform.instance,
        platform.landing,
        faulty.state,
        faulty.catalog_url,
        [*batches, late],
        landed,
        timeout=600,
    )
    print(json.dumps({**report, "in_flight_at_daemon_stop": len(in_flight)}, indent=1))
    assert report["complete"] == len(batches) + 1, report
    assert report["order_violations"] == 0 and report["source_overlaps"] == 0, report
    assert not report["failed_sources"], report
    for name in ("lost", "duplicated", "unexpected", "changed", "snapshot_disagreements"):
        assert report[name] == 0, (name, report)
    # Runs already going when the daemon stopped went on in their own processes and finished.
    for run_id in in_flight:
        assert platform.instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS, run_id
