"""The three partitioned assets of a batch. Their materialization metadata is the publish-state."""

from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_aws.s3 import S3Resource
from pydantic import Field

from publish_platform.defs.partitions import workflow_runs
from publish_platform.defs.resources import PlatformResource
from publish_platform.pipeline import run_diff, run_plan, run_publish
from publish_platform.plan import preview

GROUP = "publish"

PLAN_CHECKS = {
    "scope": (True, "Every operation stays within the batch's connection."),
    "deletion_safety": (True, "Holds a batch that deletes too much of its source, or is empty."),
    "references": (False, "Reports references to entities neither in the batch nor published."),
    "required_attributes": (False, "Reports entities lacking qualifiedName, name or connection."),
}


class DiffConfig(Config):
    force: bool = Field(
        default=False,
        description="Re-send every entity of the batch even if unchanged (repairs a drifted"
        " metastore). Deletions are computed as usual.",
    )


@asset(partitions_def=workflow_runs, group_name=GROUP)
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
            "problems": MetadataValue.json(summary.problems),
            "deletions_withheld": summary.deletions_withheld or "",
            "source_timestamp": summary.source_timestamp.isoformat()
            if summary.source_timestamp
            else "",
            "landed_at": summary.landed_at.isoformat() if summary.landed_at else "",
            "forced": summary.forced,
            "diff_s": round(summary.duration_s, 3),
            "diff_path": MetadataValue.path(state.url(state.batch_key(key, "diff.parquet"))),
            "issues_path": MetadataValue.path(state.url(state.batch_key(key, "issues.jsonl"))),
        }
    )


@asset(
    partitions_def=workflow_runs,
    group_name=GROUP,
    deps=[diff],
    check_specs=[
        AssetCheckSpec(name, asset="plan", blocking=blocking, description=description)
        for name, (blocking, description) in PLAN_CHECKS.items()
    ],
)
def plan(
    context: AssetExecutionContext, s3: S3Resource, platform: PlatformResource
) -> Iterator[MaterializeResult]:
    """Ordered operations (parents first, deletes children first), pinned to a snapshot serial."""
    import time

    started = time.perf_counter()
    client = s3.get_client()
    state = platform.state_store(client)
    settings = platform.settings()
    summary, batch_plan, checks = run_plan(state, settings, context.partition_key)
    header = batch_plan.header
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
            "plan_s": round(time.perf_counter() - started, 3),
            "plan_path": MetadataValue.path(
                state.url(state.batch_key(context.partition_key, "plan.parquet"))
            ),
            "preview": MetadataValue.md(preview(batch_plan)),
        },
        check_results=check_results,
    )


@asset(partitions_def=workflow_runs, group_name=GROUP, deps=[plan])
def publish(
    context: AssetExecutionContext, s3: S3Resource, platform: PlatformResource
) -> MaterializeResult:
    """The plan applied to the metastore in chunks; then a new snapshot and an advanced pointer."""
    client = s3.get_client()
    state = platform.state_store(client)

    def progress(done: int, total: int) -> None:
        context.log.info(f"published {done}/{total} operations")

    with platform.metastore() as metastore:
        result = run_publish(state, platform.settings(), metastore, context.partition_key, progress)
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
            "snapshot_entities": result.snapshot_entities,
            "publish_s": round(result.duration_s, 3),
            "snapshot_path": MetadataValue.path(result.snapshot_key or ""),
            "failures": MetadataValue.json(result.failures_preview),
        }
    )


def _metadata_value(value: object) -> object:
    return MetadataValue.json(value) if isinstance(value, (list, dict)) else value
