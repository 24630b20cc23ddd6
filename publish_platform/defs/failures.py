"""Tier 3 and the dead-letter queue, in Dagster.

- ``relaunch_failed_batches``: a schedule that re-launches the partitions whose latest run FAILED
  within the relaunch window and that were re-launched fewer times than allowed: one run per
  partition, through the queue like any other (Dagster's scheduler launches backfill requests —
  ``RunRequest.for_asset_graph_subset`` — as one unpartitioned run, which cannot work here).
- ``dead_letter_sensor``: on every failed run of ``publish_batch``, decides whether the failure is
  final — Dagster will not retry the run, and the schedule will not re-launch it — and only then
  dead-letters the batch, with its whole retry history from the event log, and alerts once.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

from dagster import (
    DagsterEventType,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    run_failure_sensor,
    schedule,
)
from dagster_aws.s3 import S3Resource

from publish_platform.alerts import send_alert
from publish_platform.dead_letters import Attempt, DeadLetter, DeadLetterQueue
from publish_platform.defs.jobs import PUBLISH_JOB, publish_batch
from publish_platform.defs.resources import PlatformResource
from publish_platform.landing import RunRef
from publish_platform.publish_state import PublishStatus, derive_states, unwrap_error
from publish_platform.retries import retry_tiers

RELAUNCH_TAG = "publish_platform/relaunch"
RETRIES_EXCEEDED = "Exceeded max_retries"


def _runs_of(instance: Any, partition_key: str) -> list[Any]:
    records = instance.get_run_records(
        RunsFilter(job_name=PUBLISH_JOB, tags={"dagster/partition": partition_key})
    )
    return sorted(records, key=lambda r: r.create_timestamp)


def _run_tier(tags: dict[str, str], first: bool) -> str:
    if tags.get(RELAUNCH_TAG):
        return "scheduled"
    if tags.get("dagster/retry_number"):
        return "run_retry"
    return "initial" if first else "manual"


def retry_history(instance: Any, partition_key: str) -> list[Attempt]:
    """Every attempt at a batch, from the event log: runs, op retries, in-step retries."""
    history: list[Attempt] = []
    for index, record in enumerate(_runs_of(instance, partition_key)):
        run = record.dagster_run
        tier = _run_tier(run.tags, index == 0)
        events = instance.get_records_for_run(
            run.run_id,
            of_type={
                DagsterEventType.STEP_UP_FOR_RETRY,
                DagsterEventType.STEP_FAILURE,
                DagsterEventType.ASSET_OBSERVATION,
                DagsterEventType.RUN_FAILURE,
            },
        ).records
        for event_record in events:
            entry = event_record.event_log_entry
            event = entry.dagster_event
            at = datetime.fromtimestamp(entry.timestamp, UTC)
            if event.event_type == DagsterEventType.ASSET_OBSERVATION:
                metadata = event.asset_observation_data.asset_observation.metadata
                if "tier" not in metadata:
                    continue
                history.append(
                    Attempt(
                        tier=metadata["tier"].value,
                        at=at,
                        dagster_run_id=run.run_id,
                        step=event.step_key,
                        error=str(metadata.get("error").value if "error" in metadata else ""),
                    )
                )
            elif event.event_type == DagsterEventType.STEP_UP_FOR_RETRY:
                error = event.event_specific_data.error
                history.append(
                    Attempt(
                        tier="delayed",
                        at=at,
                        dagster_run_id=run.run_id,
                        step=event.step_key,
                        error=_message(error),
                    )
                )
            elif event.event_type == DagsterEventType.STEP_FAILURE:
                history.append(
                    Attempt(
                        tier=tier,
                        at=at,
                        dagster_run_id=run.run_id,
                        step=event.step_key,
                        error=_message(event.step_failure_data.error),
                    )
                )
            elif event.event_type == DagsterEventType.RUN_FAILURE and not any(
                a.dagster_run_id == run.run_id and a.tier == tier for a in history
            ):
                history.append(
                    Attempt(tier=tier, at=at, dagster_run_id=run.run_id, error=entry.message or "")
                )
    return history


def _message(error: Any) -> str:
    if error is None:
        return "failed"
    error = unwrap_error(error)
    return f"{error.cls_name}: {error.message.strip()}"[:2000]


def relaunches(instance: Any, partition_key: str) -> int:
    return sum(1 for r in _runs_of(instance, partition_key) if r.dagster_run.tags.get(RELAUNCH_TAG))


@run_failure_sensor(
    monitored_jobs=[publish_batch],
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Dead-letters a batch whose failure is final, and alerts once per such failure.",
)
def dead_letter_sensor(
    context: RunFailureSensorContext, s3: S3Resource, platform: PlatformResource
) -> None:
    run = context.dagster_run
    key = run.tags.get("dagster/partition")
    if key is None:
        return
    if run.tags.get("dagster/will_retry") == "true":
        context.log.info(f"{key}: run {run.run_id} failed; Dagster will retry it (tier 3)")
        return
    settings = platform.settings()
    state = derive_states(context.instance, settings.landing, [key])[0]
    if state.status != PublishStatus.FAILED or state.dagster_run_id != run.run_id:
        return  # held, quarantined, or already superseded by a newer run of the partition
    # The sensor sees a failure as it happens, inside the schedule's relaunch window.
    if relaunches(context.instance, key) < retry_tiers().scheduled_relaunches:
        context.log.info(f"{key}: failed; the relaunch schedule will try again (tier 3)")
        return
    details = state.failure_details
    landing = settings.landing_location
    history = retry_history(context.instance, key)
    # "Exceeded max_retries" says the tiers ran out; the reason is the error they retried.
    causes = [a.error for a in history if RETRIES_EXCEEDED not in a.error]
    reason = causes[-1] if causes else details.message if details else f"run {run.run_id} failed"
    entry = DeadLetter(
        partition_key=key,
        source=state.source_id,
        s3_path=f"s3://{landing.bucket}/{RunRef.from_partition_key(key).prefix(landing)}",
        reason=reason,
        error_type=details.error_type if details else None,
        diagnostics={
            "step": details.step if details else None,
            "attempts": state.attempts,
            "metrics": state.metrics.model_dump(),
        },
        history=history,
        last_run_id=run.run_id,
    )
    DeadLetterQueue(platform.state_store(s3.get_client())).put(entry)
    send_alert(
        "dead_letter",
        f"{key} dead-lettered after {len(entry.history)} attempt(s): {entry.reason[:300]}",
        {"partition_key": key, "source": entry.source, "run_id": run.run_id},
    )
    context.log.error(f"{key}: dead-lettered: {entry.reason[:500]}")


@schedule(
    job=publish_batch,
    cron_schedule=retry_tiers().relaunch_cron,
    default_status=DefaultScheduleStatus.RUNNING,
    description="Tier 3: re-launch failed batches of the relaunch window, one run each.",
)
def relaunch_failed_batches(
    context: ScheduleEvaluationContext, platform: PlatformResource
) -> list[RunRequest] | SkipReason:
    tiers = retry_tiers()
    settings = platform.settings()
    since = datetime.now(UTC) - timedelta(hours=tiers.relaunch_window_hours)
    states = derive_states(context.instance, settings.landing)
    failed = [
        s.partition_key
        for s in states
        if s.status == PublishStatus.FAILED and s.updated_at is not None and s.updated_at >= since
    ]
    done = {key: relaunches(context.instance, key) for key in failed}
    keys = [key for key in failed if done[key] < tiers.scheduled_relaunches]
    if not keys:
        return SkipReason("no failed batch to re-launch")
    context.log.info(f"re-launching {len(keys)} failed batch(es): {', '.join(keys[:10])}")
    return [
        RunRequest(
            # One request per re-launch: a tick evaluated twice never launches it twice.
            run_key=f"{key}#relaunch-{done[key] + 1}",
            partition_key=key,
            tags={RELAUNCH_TAG: "scheduled"},
        )
        for key in keys
    ]
