"""The job that carries one batch through diff → plan (+ checks) → publish."""

from dagster import AssetSelection, PartitionedConfig, define_asset_job, in_process_executor

from publish_platform.defs.partitions import workflow_runs
from publish_platform.ordering import tags_for_partition

PUBLISH_JOB = "publish_batch"

publish_batch = define_asset_job(
    PUBLISH_JOB,
    selection=AssetSelection.groups("publish"),
    # Every run of a partition — sensor, launchpad, backfill, retry, CLI — gets the same source
    # and priority tags, so the run queue orders and serializes them all alike.
    config=PartitionedConfig(
        partitions_def=workflow_runs,
        run_config_for_partition_key_fn=lambda _key: {},
        tags_for_partition_key_fn=tags_for_partition,
    ),
    description="Publish one workflow run (one partition): diff, plan and its checks, publish.",
    # The three steps run one after the other anyway: one process per run, not one per step.
    executor_def=in_process_executor,
)
