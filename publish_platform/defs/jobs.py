"""The job that carries one batch through diff → plan (+ checks) → publish."""

from dagster import AssetSelection, define_asset_job

PUBLISH_JOB = "publish_batch"

publish_batch = define_asset_job(
    PUBLISH_JOB,
    selection=AssetSelection.groups("publish"),  # partitioned by workflow_runs, inferred
    description="Publish one workflow run (one partition): diff, plan and its checks, publish.",
)
