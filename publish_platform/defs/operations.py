"""Operator jobs that are not a batch: rolling a source back to an older snapshot."""

from dagster import (
    Config,
    Failure,
    MetadataValue,
    OpExecutionContext,
    in_process_executor,
    job,
    op,
)
from dagster_aws.s3 import S3Resource
from pydantic import Field

from publish_platform.defs.resources import PlatformResource
from publish_platform.plan import Approval
from publish_platform.rollback import rollback

ROLLBACK_JOB = "rollback_source"


class RollbackConfig(Config):
    source: str = Field(description="connectionQualifiedName of the source to roll back")
    to_serial: int = Field(ge=1, description="the snapshot serial to restore")
    approved_by: str = Field(default="", description="approve deletions beyond the threshold")
    reason: str = Field(default="")


@op
def rollback_to_snapshot(
    context: OpExecutionContext, config: RollbackConfig, s3: S3Resource, platform: PlatformResource
) -> None:
    """Republish an older snapshot of a source through the plan checks and the publish path."""
    approval = (
        Approval(approved_by=config.approved_by, reason=config.reason)
        if config.approved_by
        else None
    )
    state = platform.state_store(s3.get_client())
    with platform.metastore() as metastore:
        result = rollback(
            state, platform.settings(), metastore, config.source, config.to_serial, approval
        )
    metadata = {
        "source": result.source,
        "from_serial": result.from_serial,
        "to_serial": result.to_serial,
        "new_serial": result.new_serial or 0,
        "creates": result.creates,
        "updates": result.updates,
        "deletes": result.deletes,
        "outcome": result.outcome,
        "approved_by": config.approved_by,
        "artifacts": MetadataValue.path(state.url(state.batch_key(result.partition_key, ""))),
    }
    if result.outcome == "held":
        raise Failure(
            description="rollback held: "
            + "; ".join(result.held_by)
            + " (approve with approved_by)",
            metadata=metadata,
        )
    context.add_output_metadata(metadata)
    context.log.info(
        f"{result.source}: serial {result.from_serial} → {result.new_serial} (content of"
        f" serial {result.to_serial})"
    )


@job(
    name=ROLLBACK_JOB, tags={"publish_platform/kind": "rollback"}, executor_def=in_process_executor
)
def rollback_source() -> None:
    rollback_to_snapshot()
