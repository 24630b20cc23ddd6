"""Dagster definitions of the platform, thin over the pure core in ``publish_platform``.

Loaded by ``workspace.yaml`` (webserver and daemon) and by the CLI.
"""

from dagster import Definitions

from publish_platform.config import load_settings
from publish_platform.defs.assets import diff, plan, publish
from publish_platform.defs.failures import dead_letter_sensor, relaunch_failed_batches
from publish_platform.defs.jobs import publish_batch
from publish_platform.defs.monitoring import dead_run_workers
from publish_platform.defs.observability import (
    monitor_publishing,
    monitor_schedule,
    publish_alerts,
    publish_queue,
)
from publish_platform.defs.operations import rollback_source
from publish_platform.defs.resources import default_resources
from publish_platform.defs.sensors import landing_sensor

defs = Definitions(
    assets=[diff, plan, publish, publish_queue],
    jobs=[publish_batch, rollback_source, monitor_publishing],
    sensors=[landing_sensor, dead_letter_sensor, dead_run_workers, publish_alerts],
    schedules=[relaunch_failed_batches, monitor_schedule(load_settings().monitor_cron)],
    resources=default_resources(),
)
