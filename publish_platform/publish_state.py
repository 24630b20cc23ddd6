"""Publish-state of each batch, derived from the Dagster event log.

Nothing else is stored: a batch's state is what its runs and the materializations of diff, plan
and publish (with their metadata) say. ``derive_states`` reads them from any Dagster instance.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from publish_platform.landing import RunRef
from publish_platform.ordering import SOURCE_TAG
from publish_platform.ordering import UNKNOWN_SOURCE as UNKNOWN_SOURCE_TAG


class PublishStatus(StrEnum):
    PENDING = "PENDING"
    PLANNING = "PLANNING"
    PLAN_COMPLETE = "PLAN_COMPLETE"
    EXECUTING = "EXECUTING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    RETRYING = "RETRYING"
    # The platform's own states.
    HELD = "HELD"  # a blocking plan check failed: waits for an operator
    QUARANTINED = "QUARANTINED"  # the batch cannot be published (bad input); nothing was
    SKIPPED = "SKIPPED"  # the workflow run did not succeed: recorded, not published
    SUPERSEDED = "SUPERSEDED"  # older than what is published for its source
    DEAD_LETTERED = "DEAD_LETTERED"  # exhausted the retry tiers


TERMINAL_NOT_OK = {
    PublishStatus.FAILED,
    PublishStatus.QUARANTINED,
    PublishStatus.HELD,
    PublishStatus.DEAD_LETTERED,
}


class BatchMetrics(BaseModel):
    lines: int = 0
    entities: int = 0
    creates: int = 0
    updates: int = 0
    deletes: int = 0
    unchanged: int = 0
    isolated: int = 0
    published: int = 0
    failed: int = 0
    requests: int = 0
    resumed: int = 0
    relationships_added: int = 0
    relationships_removed: int = 0
    relationships_repointed: int = 0
    snapshot_relationships: int = 0
    diff_s: float | None = None
    plan_s: float | None = None
    publish_s: float | None = None
    queue_wait_s: float | None = None  # run created → run started
    latency_s: float | None = None  # landed → published


class FailureDetails(BaseModel):
    step: str | None = None
    error_type: str | None = None
    message: str
    problems: list[dict[str, Any]] = Field(default_factory=list)


class PublishState(BaseModel):
    batch_id: str
    partition_key: str
    source_id: str | None = None
    app: str
    workflow_id: str
    workflow_run_id: str
    s3_path: str
    status: PublishStatus
    metrics: BatchMetrics = Field(default_factory=BatchMetrics)
    failure_details: FailureDetails | None = None
    dagster_run_id: str | None = None
    attempts: int = 0
    snapshot_serial: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


# Errors Dagster wraps around what a step raised.
DAGSTER_WRAPPERS = {
    "DagsterExecutionStepExecutionError",
    "RetryRequestedFromPolicy",
    "DagsterMaxRetriesExceededError",
}


def unwrap_error(error: Any) -> Any:
    """Dagster wraps what a step raised (execution, retry wrappers): the platform's own error."""
    while error is not None and error.cls_name in DAGSTER_WRAPPERS and error.cause:
        error = error.cause
    return error


_METRIC_FIELDS = set(BatchMetrics.model_fields)


def derive_states(
    instance: Any,
    landing_url: str,
    partition_keys: Iterable[str] | None = None,
    job_name: str = "publish_batch",
    dead_letters: dict[str, str] | None = None,
) -> list[PublishState]:
    """One PublishState per partition of the ``workflow_runs`` partitions definition.

    ``dead_letters`` maps the partitions in the dead-letter queue to the run that put them there:
    while that run is still the latest, the batch is DEAD_LETTERED rather than FAILED.
    """
    from dagster import DagsterEventType, RunsFilter

    keys = (
        list(partition_keys)
        if partition_keys is not None
        else list(instance.get_dynamic_partitions("workflow_runs"))
    )
    runs_by_key: dict[str, list[Any]] = {}
    for record in instance.get_run_records(RunsFilter(job_name=job_name)):
        key = record.dagster_run.tags.get("dagster/partition")
        if key is not None:
            runs_by_key.setdefault(key, []).append(record)

    states = []
    for key in keys:
        run = RunRef.from_partition_key(key)
        state = PublishState(
            batch_id=key,
            partition_key=key,
            app=run.app,
            workflow_id=run.workflow_id,
            workflow_run_id=run.run_id,
            s3_path=landing_url.rstrip("/") + "/" + run.prefix_in_landing(),
            status=PublishStatus.PENDING,
        )
        records = sorted(runs_by_key.get(key, []), key=lambda r: r.create_timestamp)
        state.attempts = len(records)
        if records:
            state.created_at = records[0].create_timestamp
            latest = records[-1]
            state.updated_at = (
                latest.end_time
                and datetime.fromtimestamp(latest.end_time, UTC)
                or latest.update_timestamp
            )
            _apply_run(instance, state, latest, DagsterEventType)
            if (
                dead_letters
                and state.status == PublishStatus.FAILED
                and dead_letters.get(key) == state.dagster_run_id
            ):
                state.status = PublishStatus.DEAD_LETTERED
        states.append(state)
    return states


def _apply_run(instance: Any, state: PublishState, record: Any, event_types: Any) -> None:
    from dagster import DagsterRunStatus

    run = record.dagster_run
    state.dagster_run_id = run.run_id
    events = instance.get_records_for_run(
        run.run_id,
        of_type={
            event_types.ASSET_MATERIALIZATION,
            event_types.ASSET_CHECK_EVALUATION,
            event_types.STEP_FAILURE,
            event_types.RUN_FAILURE,
        },
    ).records
    materialized: dict[str, dict[str, Any]] = {}
    failed_checks: list[dict[str, Any]] = []
    step_failure: FailureDetails | None = None
    for event_record in events:
        event = event_record.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type == event_types.ASSET_MATERIALIZATION:
            materialization = event.step_materialization_data.materialization
            name = materialization.asset_key.to_user_string()
            materialized[name] = {k: v.value for k, v in materialization.metadata.items()}
        elif event.event_type == event_types.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            if not evaluation.passed:
                failed_checks.append(
                    {
                        "check": evaluation.check_name,
                        "blocking": bool(evaluation.blocking),
                        "message": evaluation.description or "",
                    }
                )
        elif event.event_type == event_types.STEP_FAILURE and step_failure is None:
            error = event.step_failure_data.error
            user = event.step_failure_data.user_failure_data
            reported = user.metadata.get("error_type") if user is not None else None
            error = unwrap_error(error)
            step_failure = FailureDetails(
                step=event.step_key,
                error_type=reported.value if reported else error.cls_name if error else None,
                message=(
                    user.description
                    if user is not None and user.description
                    else error.message.strip()
                    if error
                    else "step failed"
                )[:4000],
            )

    # Known from the run's tags before diff has read the batch (queued runs have a source too).
    tagged = run.tags.get(SOURCE_TAG)
    if tagged and tagged != UNKNOWN_SOURCE_TAG:
        state.source_id = tagged
    for metadata in materialized.values():
        for name, value in metadata.items():
            if name in _METRIC_FIELDS and isinstance(value, int | float):
                setattr(state.metrics, name, value)
        if metadata.get("source"):
            state.source_id = metadata["source"]
    diff_meta = materialized.get("diff", {})
    publish_meta = materialized.get("publish")

    status = run.status
    if status in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING):
        state.status = PublishStatus.PENDING
    elif status in (DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING) and publish_meta is None:
        in_plan = "plan" in materialized
        state.status = PublishStatus.EXECUTING if in_plan else PublishStatus.PLANNING
    elif publish_meta is not None:
        # Published (the run may still be finishing): the outcome says what happened.
        state.snapshot_serial = publish_meta.get("serial")
        outcome = publish_meta.get("outcome")
        if outcome == "superseded" or diff_meta.get("outcome") == "superseded":
            state.status = PublishStatus.SUPERSEDED
            problems = diff_meta.get("problems") or []
            state.failure_details = FailureDetails(
                step="diff" if problems else "publish",
                error_type="superseded",
                message="; ".join(p.get("message", "") for p in problems)
                or "newer data of the source was published first",
                problems=problems,
            )
        elif outcome == "not_publishable":
            skipped = diff_meta.get("outcome") == "skipped"
            state.status = PublishStatus.SKIPPED if skipped else PublishStatus.QUARANTINED
            problems = diff_meta.get("problems") or []
            state.failure_details = FailureDetails(
                step="diff",
                error_type=diff_meta.get("outcome"),
                message="; ".join(p.get("message", "") for p in problems) or "not publishable",
                problems=problems,
            )
        elif status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.STARTED):
            state.status = PublishStatus.COMPLETE
        else:
            state.status = PublishStatus.FAILED
    elif any(check["blocking"] for check in failed_checks):
        state.status = PublishStatus.HELD
        state.failure_details = FailureDetails(
            step="plan",
            error_type="blocking_check_failed",
            message="; ".join(c["message"] for c in failed_checks if c["blocking"]),
            problems=failed_checks,
        )
    elif step_failure is not None and step_failure.error_type == "PlanHeldError":
        # Re-planned at publish (the source moved on), the plan now fails a blocking check.
        state.status = PublishStatus.HELD
        state.failure_details = step_failure
    elif status == DagsterRunStatus.SUCCESS and "plan" in materialized:
        state.status = PublishStatus.PLAN_COMPLETE
    else:
        state.status = PublishStatus.FAILED
        state.failure_details = step_failure or FailureDetails(
            message=f"run {run.run_id} ended {status.value}"
        )
