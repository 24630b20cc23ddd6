"""The job that carries one batch through diff → plan (+ checks) → publish."""

from dagster import AssetSelection, define_asset_job

from publish_platform.defs.partitions import workflow_runs

PUBLISH_JOB = "publish_batch"

publish_batch = define_asset_job(
    PUBLISH_JOB,
    selection=AssetSelection.groups("publish"),
    partitions_def=workflow_runs,
    description="Publish one workflow run (one partition): diff, plan and its checks, publish.",
)
