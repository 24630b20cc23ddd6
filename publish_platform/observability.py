"""Queue metrics, alert rules, completion estimates and trends, from batches' publish-states.

Pure functions over ``PublishState`` lists (what ``derive_states`` reads from the event log), so
that every number the monitoring schedule records, every alert the alert sensor raises and every
figure of the status page is computed one way, and can be tested from a known history.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from publish_platform.config import Settings
from publish_platform.publish_state import PublishState, PublishStatus, derive_states
from publish_platform.state import StateStore

IN_FLIGHT = {
    PublishStatus.PENDING,
    PublishStatus.PLANNING,
    PublishStatus.EXECUTING,
    PublishStatus.RETRYING,
}
SUCCEEDED = {PublishStatus.COMPLETE, PublishStatus.SUPERSEDED, PublishStatus.SKIPPED}
ERRORED = {PublishStatus.FAILED, PublishStatus.DEAD_LETTERED, PublishStatus.QUARANTINED}
FINISHED = SUCCEEDED | ERRORED
UNKNOWN_SOURCE = "(unknown source)"


def current_states(instance: Any, settings: Settings, state: StateStore) -> list[PublishState]:
    """Every batch's publish-state, dead letters included (what operators and pages see)."""
    from publish_platform.dead_letters import DeadLetterQueue

    dead = {e.partition_key: e.last_run_id for e in DeadLetterQueue(state).list()}
    states = derive_states(instance, settings.landing, dead_letters=dead)
    states.sort(key=lambda s: (s.created_at is None, s.created_at or 0, s.partition_key))
    return states


def source_of(state: PublishState) -> str:
    return state.source_id or UNKNOWN_SOURCE


def latency_s(state: PublishState) -> float | None:
    """Landed → published when the publish step measured it, else first launch → last end."""
    if state.metrics.latency_s is not None:
        return state.metrics.latency_s
    if state.created_at and state.updated_at:
        return max(0.0, (state.updated_at - state.created_at).total_seconds())
    return None


def step_duration_s(state: PublishState) -> float | None:
    """Time the batch's steps took (what one more batch of the source will need)."""
    parts = [state.metrics.diff_s, state.metrics.plan_s, state.metrics.publish_s]
    known = [p for p in parts if p is not None]
    return sum(known) if known else None


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (``share`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def _finished_between(
    states: Iterable[PublishState], start: datetime, end: datetime
) -> list[PublishState]:
    return [
        s
        for s in states
        if s.status in FINISHED and s.updated_at is not None and start <= s.updated_at <= end
    ]


# --- queue metrics ---------------------------------------------------------------------------


class QueueMetrics(BaseModel):
    """The queue at one moment, and the throughput of the window before it."""

    at: datetime
    window_hours: float
    depth: int = 0  # batches landed and not yet finished (queued or running)
    depth_by_source: dict[str, int] = Field(default_factory=dict)
    held: int = 0  # waiting for an operator's approval
    oldest_pending_age_s: float | None = None
    batches_per_hour: float = 0.0
    entities_per_hour: float = 0.0
    error_rate: float | None = None  # errored / finished in the window
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None

    def numeric(self) -> dict[str, float]:
        """The plottable numbers (a missing value is left out, not drawn as zero)."""
        values = {
            "depth": self.depth,
            "held": self.held,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "batches_per_hour": self.batches_per_hour,
            "entities_per_hour": self.entities_per_hour,
            "error_rate": self.error_rate,
            "latency_p50_s": self.latency_p50_s,
            "latency_p95_s": self.latency_p95_s,
        }
        return {k: float(v) for k, v in values.items() if v is not None}


def queue_metrics(
    states: Sequence[PublishState], now: datetime, window: timedelta = timedelta(hours=1)
) -> QueueMetrics:
    pending = [s for s in states if s.status in IN_FLIGHT]
    by_source: dict[str, int] = defaultdict(int)
    for state in pending:
        by_source[source_of(state)] += 1
    ages = [(now - s.created_at).total_seconds() for s in pending if s.created_at]
    finished = _finished_between(states, now - window, now)
    completed = [s for s in finished if s.status == PublishStatus.COMPLETE]
    hours = window.total_seconds() / 3600
    latencies = [v for s in completed if (v := latency_s(s)) is not None]
    return QueueMetrics(
        at=now,
        window_hours=hours,
        depth=len(pending),
        depth_by_source=dict(sorted(by_source.items())),
        held=sum(1 for s in states if s.status == PublishStatus.HELD),
        oldest_pending_age_s=max(ages) if ages else None,
        batches_per_hour=len(completed) / hours,
        entities_per_hour=sum(s.metrics.published for s in completed) / hours,
        error_rate=(
            sum(1 for s in finished if s.status in ERRORED) / len(finished) if finished else None
        ),
        latency_p50_s=percentile(latencies, 0.5),
        latency_p95_s=percentile(latencies, 0.95),
    )


# --- completion estimates --------------------------------------------------------------------


def typical_duration_s(states: Sequence[PublishState], source: str) -> float | None:
    """Median step time of the source's recent completed batches (any source's if it has none)."""

    def median_of(candidates: Iterable[PublishState]) -> float | None:
        recent = sorted(
            (s for s in candidates if s.status == PublishStatus.COMPLETE and s.updated_at),
            key=lambda s: s.updated_at,  # type: ignore[arg-type, return-value]
        )[-20:]
        return percentile([d for s in recent if (d := step_duration_s(s)) is not None], 0.5)

    own = median_of(s for s in states if source_of(s) == source)
    return own if own is not None else median_of(states)


def estimated_completions(
    states: Sequence[PublishState], now: datetime, fallback_s: float = 60.0
) -> dict[str, datetime]:
    """When each batch in flight should finish. A source's batches run one at a time, oldest
    first, each taking the source's typical step time."""
    estimates: dict[str, datetime] = {}
    by_source: dict[str, list[PublishState]] = defaultdict(list)
    for state in states:
        if state.status in IN_FLIGHT:
            by_source[source_of(state)].append(state)
    for source, queued in by_source.items():
        each = typical_duration_s(states, source) or fallback_s
        queued.sort(key=lambda s: s.created_at or now)
        finish = now
        for position, state in enumerate(queued):
            if position == 0 and state.status != PublishStatus.PENDING:  # running now
                started = state.updated_at or state.created_at or now
                finish = max(now, started + timedelta(seconds=each))
            else:
                finish += timedelta(seconds=each)
            estimates[state.partition_key] = finish
    return estimates


# --- alert rules -----------------------------------------------------------------------------


class AlertThresholds(BaseModel):
    queue_depth: int = 100  # batches in flight across all sources
    queue_age_minutes: float = 30.0  # oldest batch in flight
    sla_minutes: float = 60.0  # landed → published, per batch
    anomaly_min_recent: int = 3  # finished batches in the window before a rate is judged
    anomaly_min_history: int = 5  # older finished batches the source needs for a baseline


class Alert(BaseModel):
    rule: str
    key: str  # stable while the condition lasts: an alert is sent once per episode
    message: str
    details: dict[str, object] = Field(default_factory=dict)


def queue_buildup(metrics: QueueMetrics, thresholds: AlertThresholds) -> list[Alert]:
    age = metrics.oldest_pending_age_s or 0.0
    too_deep = metrics.depth >= thresholds.queue_depth
    too_old = age >= thresholds.queue_age_minutes * 60
    if not (too_deep or too_old):
        return []
    return [
        Alert(
            rule="queue_buildup",
            key="queue_buildup",
            message=f"{metrics.depth} batches in flight (alert at {thresholds.queue_depth}),"
            f" oldest {age / 60:.0f} min (alert at {thresholds.queue_age_minutes:.0f} min)",
            details={"depth_by_source": metrics.depth_by_source, "oldest_pending_age_s": age},
        )
    ]


def error_rate_anomalies(
    states: Sequence[PublishState],
    now: datetime,
    window: timedelta,
    thresholds: AlertThresholds,
) -> list[Alert]:
    """A source failing far more often in the window than in its own history: more than three
    standard errors above its historical rate (a binomial test), and at least two failures."""
    alerts = []
    by_source: dict[str, list[PublishState]] = defaultdict(list)
    for state in states:
        if state.status in FINISHED and state.updated_at is not None:
            by_source[source_of(state)].append(state)
    for source, finished in sorted(by_source.items()):
        recent = [s for s in finished if s.updated_at >= now - window]  # type: ignore[operator]
        history = [s for s in finished if s.updated_at < now - window][-200:]  # type: ignore[operator]
        if len(recent) < thresholds.anomaly_min_recent:
            continue
        if len(history) < thresholds.anomaly_min_history:
            continue
        failures = sum(1 for s in recent if s.status in ERRORED)
        rate = failures / len(recent)
        baseline = sum(1 for s in history if s.status in ERRORED) / len(history)
        p = min(max(baseline, 0.01), 0.99)
        limit = baseline + 3 * math.sqrt(p * (1 - p) / len(recent))
        if failures >= 2 and rate > limit:
            alerts.append(
                Alert(
                    rule="error_rate_anomaly",
                    key=f"error_rate_anomaly:{source}",
                    message=f"{source}: {failures} of {len(recent)} batches failed in the last"
                    f" {window.total_seconds() / 3600:g} h ({rate:.0%}); its usual rate is"
                    f" {baseline:.0%} over {len(history)} batches",
                    details={"source": source, "rate": rate, "baseline": baseline},
                )
            )
    return alerts


def predicted_sla_breaches(
    states: Sequence[PublishState], now: datetime, thresholds: AlertThresholds
) -> list[Alert]:
    """A batch in flight whose estimated completion is later than its landing plus the SLA."""
    sla = timedelta(minutes=thresholds.sla_minutes)
    estimates = estimated_completions(states, now)
    late: dict[str, list[tuple[PublishState, datetime]]] = defaultdict(list)
    for state in states:
        eta = estimates.get(state.partition_key)
        if eta is not None and state.created_at is not None and eta > state.created_at + sla:
            late[source_of(state)].append((state, eta))
    alerts = []
    for source, batches in sorted(late.items()):
        state, eta = max(batches, key=lambda item: item[1] - item[0].created_at)  # type: ignore[operator]
        alerts.append(
            Alert(
                rule="sla_breach_predicted",
                key=f"sla_breach_predicted:{source}",
                message=f"{source}: {len(batches)} batch(es) will miss the"
                f" {thresholds.sla_minutes:g} min SLA; {state.partition_key} is expected at"
                f" {eta.isoformat(timespec='seconds')}",
                details={"source": source, "batches": [s.partition_key for s, _ in batches]},
            )
        )
    return alerts


def evaluate_alerts(
    states: Sequence[PublishState],
    now: datetime,
    window: timedelta,
    thresholds: AlertThresholds,
) -> list[Alert]:
    """Every rule but dead letters (alerted once per final failure by the dead-letter sensor)."""
    metrics = queue_metrics(states, now, window)
    return [
        *queue_buildup(metrics, thresholds),
        *error_rate_anomalies(states, now, window, thresholds),
        *predicted_sla_breaches(states, now, thresholds),
    ]


# --- history and trends ----------------------------------------------------------------------


class DailyTrend(BaseModel):
    day: str
    batches: int
    errors: int
    latency_p50_s: float | None
    entities: int


class SourceReliability(BaseModel):
    source: str
    finished: int
    succeeded: int
    success_rate: float | None


class VolumePoint(BaseModel):
    partition_key: str
    source: str
    entities: int
    publish_s: float


class Trends(BaseModel):
    daily: list[DailyTrend]
    reliability: list[SourceReliability]
    volume_vs_time: list[VolumePoint]
    seconds_per_1k_entities: float | None  # least-squares slope of publish time on volume


def trends(states: Sequence[PublishState], days: int = 14, now: datetime | None = None) -> Trends:
    now = now or datetime.now(UTC)
    finished = _finished_between(states, now - timedelta(days=days), now)
    by_day: dict[str, list[PublishState]] = defaultdict(list)
    for state in finished:
        by_day[state.updated_at.date().isoformat()].append(state)  # type: ignore[union-attr]
    daily = [
        DailyTrend(
            day=day,
            batches=len(items),
            errors=sum(1 for s in items if s.status in ERRORED),
            latency_p50_s=percentile(
                [v for s in items if s.status == PublishStatus.COMPLETE if (v := latency_s(s))],
                0.5,
            ),
            entities=sum(s.metrics.published for s in items),
        )
        for day, items in sorted(by_day.items())
    ]
    per_source: dict[str, list[PublishState]] = defaultdict(list)
    for state in states:
        if state.status in FINISHED:
            per_source[source_of(state)].append(state)
    reliability = sorted(
        (
            SourceReliability(
                source=source,
                finished=len(items),
                succeeded=sum(1 for s in items if s.status in SUCCEEDED),
                success_rate=sum(1 for s in items if s.status in SUCCEEDED) / len(items),
            )
            for source, items in per_source.items()
        ),
        key=lambda r: (r.success_rate if r.success_rate is not None else 1.0, r.source),
    )
    points = [
        VolumePoint(
            partition_key=s.partition_key,
            source=source_of(s),
            entities=s.metrics.creates + s.metrics.updates + s.metrics.deletes,
            publish_s=s.metrics.publish_s,
        )
        for s in finished
        if s.status == PublishStatus.COMPLETE and s.metrics.publish_s is not None
    ]
    return Trends(
        daily=daily,
        reliability=reliability,
        volume_vs_time=points,
        seconds_per_1k_entities=_slope([(p.entities, p.publish_s) for p in points]),
    )


def _slope(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    return covariance / variance * 1000
