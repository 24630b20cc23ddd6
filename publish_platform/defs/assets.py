"""The three partitioned assets of a batch. Their materialization metadata is the publish-state."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetObservation,
    Backoff,
    Config,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    RetryRequested,
    asset,
)
from dagster_aws.s3 import S3Resource
from pydantic import Field

from publish_platform.defs.partitions import workflow_runs
from publish_platform.defs.resources import PlatformResource
from publish_platform.metastores.base import ThrottledError
from publish_platform.pipeline import PlanHeldError, publish_with_replan, run_diff, run_plan
from publish_platform.plan import Approval, preview
from publish_platform.retries import delayed_wait, retry_tiers

GROUP = "publish"
ISOLATED_PREVIEW = 20  # isolated entities shown in the plan's log and metadata
TIERS = retry_tiers()
# Tier 2: a failed step (S3 or metastore unavailable) is retried with exponential backoff and
# jitter; throttling raises RetryRequested to wait at least the metastore's Retry-After.
DELAYED_RETRIES = RetryPolicy(
    max_retries=TIERS.delayed_retries,
    delay=TIERS.delayed_base,
    backoff=Backoff.EXPONENTIAL,
    jitter=Jitter.PLUS_MINUS,
)

PLAN_CHECKS = {
    "scope": (True, "Every operation stays within the batch's connection."),
    "deletion_safety": (True, "Holds a batch that deletes too much of its source, or is empty."),
    "references": (False, "Reports references to entities neither in the batch nor published."),
    "required_attributes": (False, "Reports entities lacking qualifiedName, name or connection."),
}


class PlanConfig(Config):
    """An operator's approval of a batch held by the deletion-safety check."""

    approve_deletions: bool = Field(
        default=False, description="Let this batch's deletions through despite the threshold."
    )
    approved_by: str = Field(default="", description="Who approves (recorded with the plan).")
    reason: str = Field(default="", description="Why (recorded with the plan).")

    def approval(self) -> Approval | None:
        if not self.approve_deletions:
            return None
        if not self.approved_by:
            raise Failure("approve_deletions needs approved_by: who approves")
        return Approval(approved_by=self.approved_by, reason=self.reason)


class DiffConfig(Config):
    force: bool = Field(
        default=False,
        description="Re-send every entity of the batch even if unchanged (repairs a drifted"
        " metastore). Deletions are computed as usual.",
    )


@asset(partitions_def=workflow_runs, group_name=GROUP, retry_policy=DELAYED_RETRIES)
def diff(
    context: AssetExecutionContext, config: DiffConfig, s3: S3Resource, platform: PlatformResource
) -> MaterializeResult:
    """The workflow run's entities compared with its source's current snapshot."""
    client = s3.get_client()
    state = platform.state_store(client)
    summary = run_diff(
        client, state, platform.settings(), context.partition_key, force=config.force
    )
    for problem in summary.problems:
        context.log.error(f"{summary.outcome}: {problem['kind']}: {problem['message']}")
    for issue in summary.issues_preview:
        context.log.warning(
            f"isolated {issue['source_file']}:{issue['line']} ({issue['reason']}):"
            f" {issue['message']}"
        )
    if summary.deletions_withheld:
        context.log.warning(summary.deletions_withheld)
    key = context.partition_key
    return MaterializeResult(
        metadata={
            "outcome": summary.outcome,
            "source": summary.source or "",
            "mode": summary.mode,
            "base_serial": summary.base_serial,
            "files": summary.files,
            "lines": summary.lines,
            "entities": summary.valid_entities,
            "creates": summary.creates,
            "updates": summary.updates,
            "deletes": summary.deletes,
            "unchanged": summary.unchanged,
            "isolated": summary.isolated,
            "issue_counts": MetadataValue.json(summary.issue_counts),
            # The first isolated lines with file, line, reason and message, as in issues.jsonl.
            "issues": MetadataValue.json(summary.issues_preview),
            "problems": MetadataValue.json(summary.problems),
            "deletions_withheld": summary.deletions_withheld or "",
            "source_timestamp": summary.source_timestamp.isoformat()
            if summary.source_timestamp
            else "",
            "landed_at": summary.landed_at.isoformat() if summary.landed_at else "",
            "forced": summary.forced,
            "diff_s": round(summary.duration_s, 3),
            "queue_wait_s": _queue_wait_s(context),
            "diff_path": MetadataValue.path(state.url(state.batch_key(key, "diff.parquet"))),
            "issues_path": MetadataValue.path(state.url(state.batch_key(key, "issues.jsonl"))),
        }
    )


@asset(
    partitions_def=workflow_runs,
    group_name=GROUP,
    deps=[diff],
    retry_policy=DELAYED_RETRIES,
    check_specs=[
        AssetCheckSpec(name, asset="plan", blocking=blocking, description=description)
        for name, (blocking, description) in PLAN_CHECKS.items()
    ],
)
def plan(
    context: AssetExecutionContext,
    config: PlanConfig,
    s3: S3Resource,
    platform: PlatformResource,
) -> Iterator[MaterializeResult]:
    """Ordered operations (parents first, deletes children first), pinned to a snapshot serial."""
    started = time.perf_counter()
    client = s3.get_client()
    state = platform.state_store(client)
    settings = platform.settings()
    approval = config.approval()
    with platform.metastore() as metastore:
        summary, batch_plan, checks = run_plan(
            state, settings, context.partition_key, metastore, approval
        )
    header = batch_plan.header
    for row in batch_plan.isolated.head(ISOLATED_PREVIEW).iter_rows(named=True):
        context.log.warning(
            f"isolated by plan rules: {row['type_name']} {row['qualified_name']}"
            f" ({row['reason']}): {row['message']}"
        )
    if header.approval is not None:
        context.log.info(
            f"deletions approved by {header.approval.approved_by}: {header.approval.reason}"
        )
    check_results = [
        AssetCheckResult(
            check_name=outcome.name,
            passed=outcome.passed,
            severity=AssetCheckSeverity.ERROR if outcome.blocking else AssetCheckSeverity.WARN,
            description=outcome.description,
            metadata={key: _metadata_value(value) for key, value in outcome.metadata.items()},
        )
        for outcome in checks
    ]
    for outcome in checks:
        if not outcome.passed:
            log = context.log.error if outcome.blocking else context.log.warning
            log(f"check {outcome.name}: {outcome.description}")
    yield MaterializeResult(
        metadata={
            "outcome": summary.outcome,
            "source": header.source,
            "mode": header.mode,
            "base_serial": header.base_serial,
            "operations": header.operations,
            "creates": header.creates,
            "updates": header.updates,
            "deletes": header.deletes,
            "unchanged": header.unchanged,
            "snapshot_entities": header.snapshot_entities,
            "isolated": header.isolated,
            "isolated_by_plan": header.isolated_by_plan,
            "isolated_by_plan_preview": MetadataValue.json(
                batch_plan.isolated.head(ISOLATED_PREVIEW).to_dicts()
            ),
            "relationships_added": header.relationships_added,
            "relationships_removed": header.relationships_removed,
            "relationships_repointed": header.relationships_repointed,
            "deletion_threshold": header.deletion_threshold or 0.0,
            "approved_by": header.approval.approved_by if header.approval else "",
            "approval_reason": header.approval.reason if header.approval else "",
            "plan_id": header.plan_id,
            "plan_s": round(time.perf_counter() - started, 3),
            "plan_path": MetadataValue.path(
                state.url(state.batch_key(context.partition_key, "plan.parquet"))
            ),
            "preview": MetadataValue.md(preview(batch_plan)),
        },
        check_results=check_results,
    )


@asset(
    partitions_def=workflow_runs,
    group_name=GROUP,
    deps=[plan],
    retry_policy=DELAYED_RETRIES,
)
def publish(
    context: AssetExecutionContext, s3: S3Resource, platform: PlatformResource
) -> MaterializeResult:
    """The plan applied to the metastore in chunks; then a new snapshot and an advanced pointer."""
    client = s3.get_client()
    state = platform.state_store(client)

    def progress(done: int, total: int) -> None:
        context.log.info(f"published {done}/{total} operations")

    def immediate_retry(attempt: int, exc: Exception) -> None:
        # Tier 1, recorded in the event log so that the batch's retry history is complete.
        context.log.warning(f"tier 1: retrying a chunk (attempt {attempt}) after {exc}")
        context.log_event(
            AssetObservation(
                asset_key="publish",
                partition=context.partition_key,
                metadata={"tier": "immediate", "attempt": attempt, "error": str(exc)[:2000]},
            )
        )

    try:
        with platform.metastore() as metastore:
            result = publish_with_replan(
                client,
                state,
                platform.settings(),
                metastore,
                context.partition_key,
                progress,
                on_retry=immediate_retry,
            )
    except PlanHeldError as exc:
        # Waiting for an operator: retrying would not change the answer.
        raise Failure(
            description=str(exc), metadata={"error_type": "PlanHeldError"}, allow_retries=False
        ) from exc
    except ThrottledError as exc:
        # Tier 2 for throttling: never sooner than the metastore's Retry-After.
        wait = delayed_wait(context.retry_number, TIERS, exc.retry_after)
        context.log.warning(f"throttled ({exc}); retrying in {wait:.1f}s")
        raise RetryRequested(max_retries=TIERS.delayed_retries, seconds_to_wait=wait) from exc
    if result.replanned:
        context.log.warning("the plan was stale (its source moved on): re-planned and re-checked")
    if result.resumed:
        context.log.info(f"resumed: {result.resumed} operations were applied by an earlier attempt")
    for failure in result.failures_preview:
        context.log.error(
            f"failed {failure['type_name']} {failure['qualified_name']}: {failure['error']}"
        )
    return MaterializeResult(
        metadata={
            "outcome": result.outcome,
            "source": result.source or "",
            "serial": result.serial if result.serial is not None else 0,
            "operations": result.operations,
            "published": result.succeeded,
            "failed": result.failed,
            "requests": result.requests,
            "split_chunks": result.split_chunks,
            "resumed": result.resumed,
            "immediate_retries": result.immediate_retries,
            "replanned": result.replanned,
            "snapshot_entities": result.snapshot_entities,
            "snapshot_relationships": result.snapshot_relationships,
            "publish_s": round(result.duration_s, 3),
            **_latency(result.landed_at),
            "snapshot_path": MetadataValue.path(result.snapshot_key or ""),
            "failures": MetadataValue.json(result.failures_preview),
        }
    )


def _queue_wait_s(context: AssetExecutionContext) -> float:
    """How long this run waited in the queue (created → started)."""
    record = context.instance.get_run_record_by_id(context.run_id)
    if record is None or record.start_time is None:
        return 0.0
    return round(max(0.0, record.start_time - record.create_timestamp.timestamp()), 3)


def _latency(landed_at: datetime | None) -> dict[str, float]:
    """Landed → published, for the UI's plots and the status page."""
    if landed_at is None:
        return {}
    return {"latency_s": round((datetime.now(UTC) - landed_at).total_seconds(), 3)}


def _metadata_value(value: object) -> object:
    return MetadataValue.json(value) if isinstance(value, (list, dict)) else value
