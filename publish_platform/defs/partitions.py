"""One dynamic partition per workflow run, keyed ``<app>/<workflow_id>/<run_id>``."""

from dagster import DynamicPartitionsDefinition

workflow_runs = DynamicPartitionsDefinition(name="workflow_runs")
