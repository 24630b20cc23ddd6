"""Detect runs whose worker died, so that Dagster's run retries (tier 3) can take over.

Dagster's run monitoring checks worker health for launchers that support it (Kubernetes, ECS,
Docker). The default launcher runs workers as local processes and has no health check: a worker
killed outright (kill -9, OOM) would leave its run STARTED forever. This sensor, running in the
daemon on the same machine, fails such runs; ``run_retries`` in dagster.yaml then re-launches
them, and publish resumes from its checkpoints.
"""

import os
from pathlib import Path

from dagster import (
    DagsterEventType,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from dagster._core.launcher import DefaultRunLauncher

WORKER_STARTED = "Started process for run"


def worker_started(instance: object, run_id: str) -> tuple[int, float] | None:
    """The run worker's pid and when it reported itself started (epoch seconds)."""
    records = instance.get_records_for_run(  # type: ignore[attr-defined]
        run_id, of_type=DagsterEventType.ENGINE_EVENT
    ).records
    for record in reversed(records):
        entry = record.event_log_entry
        if entry.message and entry.message.startswith(WORKER_STARTED):
            pid = entry.dagster_event.engine_event_data.metadata.get("pid")
            return (int(pid.value), entry.timestamp) if pid is not None else None
    return None


def _process_started_at(pid: int) -> float | None:
    """Start time (epoch seconds) of a live process, from /proc; None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        booted = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, StopIteration, IndexError):
        return None
    return booted + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def worker_alive(pid: int, reported_at: float) -> bool:
    """The process exists and is the one that reported (a reused pid started later)."""
    started = _process_started_at(pid)
    return started is not None and started <= reported_at + 2.0


@sensor(
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Fails runs whose local worker process died, so run retries re-launch them.",
)
def dead_run_workers(context: SensorEvaluationContext) -> SkipReason:
    instance = context.instance
    if not isinstance(instance.run_launcher, DefaultRunLauncher) or not Path("/proc").is_dir():
        return SkipReason("the run launcher has its own health checks (or no /proc here)")
    failed = []
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        run = record.dagster_run
        worker = worker_started(instance, run.run_id)
        if worker is None or worker_alive(*worker):
            continue
        pid = worker[0]
        instance.report_run_failed(run, f"run worker (pid {pid}) is gone: it crashed or was killed")
        failed.append(run.run_id)
        context.log.error(f"run {run.run_id}: worker pid {pid} is gone; marked failed")
    return SkipReason(f"failed {len(failed)} run(s) with a dead worker" if failed else "all alive")
