"""Dagster definitions of the platform, thin over the pure core in ``publish_platform``.

Loaded by ``workspace.yaml`` (webserver and daemon) and by the CLI.
"""

from dagster import Definitions

from publish_platform.defs.assets import diff, plan, publish
from publish_platform.defs.failures import dead_letter_sensor, relaunch_failed_batches
from publish_platform.defs.jobs import publish_batch
from publish_platform.defs.monitoring import dead_run_workers
from publish_platform.defs.operations import rollback_source
from publish_platform.defs.resources import default_resources
from publish_platform.defs.sensors import landing_sensor

defs = Definitions(
    assets=[diff, plan, publish],
    jobs=[publish_batch, rollback_source],
    sensors=[landing_sensor, dead_letter_sensor, dead_run_workers],
    schedules=[relaunch_failed_batches],
    resources=default_resources(),
)
