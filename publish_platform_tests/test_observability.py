"""Queue metrics, alert rules, completion estimates, trends and the status page, computed from a
known history of publish-states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from publish_platform.defs.observability import alerts_to_send
from publish_platform.observability import (
    AlertThresholds,
    error_rate_anomalies,
    estimated_completions,
    evaluate_alerts,
    percentile,
    predicted_sla_breaches,
    queue_buildup,
    queue_metrics,
    trends,
)
from publish_platform.publish_state import BatchMetrics, PublishState, PublishStatus
from publish_platform.status_page import render_html, status_document

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
_counter = iter(range(10_000))


def batch(
    source: str | None,
    status: PublishStatus,
    created_min_ago: float,
    finished_min_ago: float | None = None,
    **metrics: float,
) -> PublishState:
    n = next(_counter)
    created = NOW - timedelta(minutes=created_min_ago)
    updated = NOW - timedelta(minutes=finished_min_ago) if finished_min_ago is not None else created
    return PublishState(
        batch_id=f"app/wf/{n}",
        partition_key=f"app/wf/{n}",
        source_id=source,
        app="app",
        workflow_id="wf",
        workflow_run_id=str(n),
        s3_path=f"s3://landing/{n}/",
        status=status,
        metrics=BatchMetrics(**metrics),
        created_at=created,
        updated_at=updated,
    )


def test_percentile_is_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([30, 10, 20], 0.5) == 20
    assert percentile([30, 10, 20], 0.95) == 30
    assert percentile(list(range(1, 101)), 0.95) == 95


def test_queue_metrics_from_a_known_history():
    states = [
        batch("a", PublishStatus.COMPLETE, 50, 40, latency_s=10, published=100),
        batch("a", PublishStatus.COMPLETE, 40, 30, latency_s=20, published=200),
        batch("b", PublishStatus.COMPLETE, 30, 20, latency_s=30, published=300),
        batch("b", PublishStatus.FAILED, 25, 15),
        batch("b", PublishStatus.COMPLETE, 200, 130, latency_s=999, published=5000),  # old
        batch("a", PublishStatus.PENDING, 5),
        batch("b", PublishStatus.PENDING, 10),
        batch("a", PublishStatus.EXECUTING, 2),
        batch("c", PublishStatus.HELD, 60, 55),
    ]
    metrics = queue_metrics(states, NOW, HOUR)

    assert metrics.depth == 3 and metrics.depth_by_source == {"a": 2, "b": 1}
    assert metrics.held == 1
    assert metrics.oldest_pending_age_s == 600
    assert metrics.batches_per_hour == 3 and metrics.entities_per_hour == 600
    assert metrics.error_rate == pytest.approx(1 / 4)
    assert (metrics.latency_p50_s, metrics.latency_p95_s) == (20, 30)
    assert queue_metrics(states, NOW, 2 * HOUR).batches_per_hour == 1.5
    assert set(metrics.numeric()) >= {"depth", "error_rate", "latency_p95_s"}


def test_completion_estimates_follow_the_source_queue_one_batch_at_a_time():
    states = [  # source a takes 60 s per batch (diff + plan + publish)
        batch("a", PublishStatus.COMPLETE, 30, 29, diff_s=10, plan_s=5, publish_s=45),
        batch("a", PublishStatus.EXECUTING, 1),  # running for 20 s
        batch("a", PublishStatus.PENDING, 0.5),
        batch("b", PublishStatus.PENDING, 1),  # no history: any source's typical time
    ]
    states[1].updated_at = NOW - timedelta(seconds=20)
    eta = estimated_completions(states, NOW)

    assert eta[states[1].partition_key] == NOW + timedelta(seconds=40)
    assert eta[states[2].partition_key] == NOW + timedelta(seconds=100)
    assert eta[states[3].partition_key] == NOW + timedelta(seconds=60)


def test_queue_buildup_alerts_on_depth_or_age():
    thresholds = AlertThresholds(queue_depth=3, queue_age_minutes=30)
    shallow = [batch("a", PublishStatus.PENDING, 5), batch("b", PublishStatus.PENDING, 6)]
    assert queue_buildup(queue_metrics(shallow, NOW), thresholds) == []
    deep = [*shallow, batch("c", PublishStatus.PENDING, 1)]
    assert [a.rule for a in queue_buildup(queue_metrics(deep, NOW), thresholds)] == [
        "queue_buildup"
    ]
    old = [batch("a", PublishStatus.PENDING, 45)]
    [alert] = queue_buildup(queue_metrics(old, NOW), thresholds)
    assert "oldest 45 min" in alert.message


def _history(source: str, failures: int, total: int, start_min_ago: float) -> list[PublishState]:
    return [
        batch(
            source,
            PublishStatus.FAILED if i < failures else PublishStatus.COMPLETE,
            start_min_ago + i,
            start_min_ago + i - 1,
        )
        for i in range(total)
    ]


def test_error_rate_anomaly_is_judged_against_the_source_own_history():
    thresholds = AlertThresholds()
    usually_fine = _history("fine", 1, 20, 300) + _history("fine", 3, 4, 10)
    usually_flaky = _history("flaky", 14, 20, 300) + _history("flaky", 3, 4, 10)
    no_history = _history("new", 0, 2, 300) + _history("new", 3, 4, 10)
    alerts = error_rate_anomalies(usually_fine + usually_flaky + no_history, NOW, HOUR, thresholds)

    assert [a.key for a in alerts] == ["error_rate_anomaly:fine"]
    assert "3 of 4 batches failed" in alerts[0].message and "usual rate is 5%" in alerts[0].message


def test_a_predicted_sla_breach_alerts_before_it_happens():
    thresholds = AlertThresholds(sla_minutes=60)
    slow = [  # 30 min per batch: the third batch in line lands its data 90 min after landing
        batch("slow", PublishStatus.COMPLETE, 300, 200, diff_s=600, plan_s=600, publish_s=600),
        batch("slow", PublishStatus.PENDING, 1),
        batch("slow", PublishStatus.PENDING, 1),
        batch("slow", PublishStatus.PENDING, 1),
    ]
    fast = [
        batch("fast", PublishStatus.COMPLETE, 300, 200, diff_s=1, plan_s=1, publish_s=1),
        batch("fast", PublishStatus.PENDING, 1),
    ]
    alerts = predicted_sla_breaches(slow + fast, NOW, thresholds)

    assert [a.key for a in alerts] == ["sla_breach_predicted:slow"]
    assert alerts[0].details["batches"] == [s.partition_key for s in slow[2:]]


def test_an_alert_is_sent_once_per_episode():
    thresholds = AlertThresholds(queue_depth=1)
    building = [batch("a", PublishStatus.PENDING, 1)]
    alerts = evaluate_alerts(building, NOW, HOUR, thresholds)
    sent, cursor = alerts_to_send(alerts, None)
    assert [a.rule for a in sent] == ["queue_buildup"]
    sent, cursor = alerts_to_send(evaluate_alerts(building, NOW, HOUR, thresholds), cursor)
    assert sent == []  # still on: not sent again
    sent, cursor = alerts_to_send(evaluate_alerts([], NOW, HOUR, thresholds), cursor)
    assert sent == []  # cleared
    sent, _ = alerts_to_send(evaluate_alerts(building, NOW, HOUR, thresholds), cursor)
    assert [a.rule for a in sent] == ["queue_buildup"]  # back: a new episode


def test_trends_reliability_and_volume_against_publish_time():
    states = [
        batch("a", PublishStatus.COMPLETE, 1500, 1450, creates=1000, publish_s=2.0, published=1000),
        batch("a", PublishStatus.COMPLETE, 60, 50, updates=2000, publish_s=4.0, published=2000),
        batch("b", PublishStatus.FAILED, 60, 40),
        batch("b", PublishStatus.COMPLETE, 30, 20, creates=3000, publish_s=6.0, published=3000),
    ]
    result = trends(states, now=NOW)

    assert [(d.day, d.batches, d.errors) for d in result.daily] == [
        ("2026-11-22", 1, 0),
        ("2026-11-23", 3, 1),
    ]
    assert [(r.source, r.success_rate) for r in result.reliability] == [("b", 0.5), ("a", 1.0)]
    assert result.seconds_per_1k_entities == pytest.approx(2.0)


def test_status_document_says_each_source_status_and_the_page_shows_them():
    states = [
        batch("healthy/source", PublishStatus.COMPLETE, 30, 20, latency_s=12),
        batch("busy/source", PublishStatus.COMPLETE, 30, 25),
        batch("busy/source", PublishStatus.EXECUTING, 1),
        batch("broken/source", PublishStatus.COMPLETE, 90, 80),
        batch("broken/source", PublishStatus.DEAD_LETTERED, 30, 20),
        batch("late/source", PublishStatus.PENDING, 90),
        batch("waiting/source", PublishStatus.HELD, 20, 10),
    ]
    document = status_document(states, NOW, sla_minutes=60)
    by_source = {s.source: s for s in document.sources}

    assert {k: v.status for k, v in by_source.items()} == {
        "healthy/source": "healthy",
        "busy/source": "publishing",
        "broken/source": "failing",
        "late/source": "delayed",
        "waiting/source": "held",
    }
    assert by_source["broken/source"].last_success_at == NOW - timedelta(minutes=80)
    assert by_source["busy/source"].in_flight[0].estimated_completion is not None
    page = render_html(document)
    for source, status in {k: v.status for k, v in by_source.items()}.items():
        assert f'data-source="{source}" data-status="{status}"' in page
