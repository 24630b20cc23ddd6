"""Queue monitoring, alerts and the status page, in Dagster.

- ``monitor_publishing`` (job, run by ``monitor_schedule``): records the queue's metrics as an
  observation of the ``publish_queue`` asset — the UI plots every numeric value over time — and
  regenerates the status page (HTML and JSON) in the state store.
- ``publish_alerts`` (sensor): queue build-up, error-rate anomaly against a source's own history,
  and predicted SLA breach; each alert is sent once per episode (the sensor's cursor holds the
  conditions that are on), to the log and the webhook. Dead letters alert from
  ``dead_letter_sensor``, once per final failure.
"""

import json
from datetime import UTC, datetime

from dagster import (
    AssetObservation,
    AssetSpec,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    MetadataValue,
    OpExecutionContext,
    ScheduleDefinition,
    SensorEvaluationContext,
    SkipReason,
    job,
    op,
    sensor,
)
from dagster_aws.s3 import S3Resource

from publish_platform.alerts import send_alert
from publish_platform.defs.resources import PlatformResource
from publish_platform.observability import Alert, current_states, evaluate_alerts, queue_metrics
from publish_platform.status_page import publish_status_page

QUEUE_ASSET = "publish_queue"

publish_queue = AssetSpec(
    QUEUE_ASSET,
    group_name="monitoring",
    description="The publish queue, observed by monitor_publishing: depth (per source), oldest"
    " pending age, batches and entities per hour, error rate, p50/p95 latency. Plots in the UI.",
)


@op
def observe_queue(context: OpExecutionContext, s3: S3Resource, platform: PlatformResource) -> None:
    settings = platform.settings()
    state = platform.state_store(s3.get_client())
    now = datetime.now(UTC)
    states = current_states(context.instance, settings, state)
    metrics = queue_metrics(states, now, settings.monitor_window)
    context.log_event(
        AssetObservation(
            asset_key=QUEUE_ASSET,
            metadata={
                **metrics.numeric(),
                "depth_by_source": MetadataValue.json(metrics.depth_by_source),
            },
        )
    )
    page = publish_status_page(state, states, now, settings.sla_minutes)
    context.log.info(
        f"queue: {metrics.depth} in flight, {metrics.batches_per_hour:.1f} batches/h;"
        f" status page written to {page}"
    )


@job(description="Observe the publish queue and regenerate the status page.")
def monitor_publishing() -> None:
    observe_queue()


def monitor_schedule(cron: str) -> ScheduleDefinition:
    return ScheduleDefinition(
        job=monitor_publishing,
        cron_schedule=cron,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Queue metrics and the status page, regenerated.",
    )


def alerts_to_send(alerts: list[Alert], cursor: str | None) -> tuple[list[Alert], str]:
    """The alerts whose condition has just come on, and the new cursor (conditions on now).
    A condition that clears and comes back alerts again."""
    active_before = set(json.loads(cursor)) if cursor else set()
    fresh = [alert for alert in alerts if alert.key not in active_before]
    return fresh, json.dumps(sorted({alert.key for alert in alerts}))


@sensor(
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Alerts on queue build-up, error-rate anomalies and predicted SLA breaches.",
)
def publish_alerts(
    context: SensorEvaluationContext, s3: S3Resource, platform: PlatformResource
) -> SkipReason:
    settings = platform.settings()
    states = current_states(context.instance, settings, platform.state_store(s3.get_client()))
    alerts = evaluate_alerts(
        states, datetime.now(UTC), settings.monitor_window, settings.alert_thresholds
    )
    fresh, cursor = alerts_to_send(alerts, context.cursor)
    for alert in fresh:
        send_alert(alert.rule, alert.message, {"key": alert.key, **alert.details})
        context.log.warning(f"alert {alert.rule}: {alert.message}")
    context.update_cursor(cursor)
    return SkipReason(f"{len(alerts)} alert condition(s) on, {len(fresh)} new")
