"""The customer-facing status page: a JSON document and a static HTML page rendered from it.

Per source: its sync status, last successful publish, batches in flight with their estimated
completion, and the history of its last runs with a chart; then the queue, and the historical
analysis (daily trend, source reliability, publish time against volume). Self-contained HTML
(inline CSS and SVG, no script, nothing fetched), so it can be served from anywhere, S3 included.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from publish_platform.observability import (
    ERRORED,
    IN_FLIGHT,
    QueueMetrics,
    Trends,
    estimated_completions,
    latency_s,
    queue_metrics,
    source_of,
    trends,
)
from publish_platform.publish_state import PublishState, PublishStatus
from publish_platform.state import StateStore

HISTORY_RUNS = 20
STATUS_FOLDER = "status"
PAGE_NAME, DOCUMENT_NAME = "index.html", "status.json"

SyncStatus = Literal["healthy", "publishing", "delayed", "held", "failing"]


class BatchLine(BaseModel):
    partition_key: str
    status: PublishStatus
    finished_at: datetime | None = None
    latency_s: float | None = None
    entities: int = 0
    estimated_completion: datetime | None = None


class SourceStatus(BaseModel):
    source: str
    status: SyncStatus
    summary: str
    last_success_at: datetime | None = None
    in_flight: list[BatchLine] = Field(default_factory=list)
    history: list[BatchLine] = Field(default_factory=list)  # newest first


class StatusDocument(BaseModel):
    generated_at: datetime
    sla_minutes: float
    queue: QueueMetrics
    sources: list[SourceStatus]
    trends: Trends


def status_document(
    states: Sequence[PublishState], now: datetime, sla_minutes: float = 60.0
) -> StatusDocument:
    estimates = estimated_completions(states, now)
    by_source: dict[str, list[PublishState]] = defaultdict(list)
    for state in states:
        by_source[source_of(state)].append(state)
    sources = [
        _source_status(source, items, estimates, now, sla_minutes)
        for source, items in sorted(by_source.items())
    ]
    return StatusDocument(
        generated_at=now,
        sla_minutes=sla_minutes,
        queue=queue_metrics(states, now),
        sources=sources,
        trends=trends(states, now=now),
    )


def _source_status(
    source: str,
    states: list[PublishState],
    estimates: dict[str, datetime],
    now: datetime,
    sla_minutes: float,
) -> SourceStatus:
    in_flight = sorted(
        (s for s in states if s.status in IN_FLIGHT), key=lambda s: s.created_at or now
    )
    finished = sorted(
        (s for s in states if s.status not in IN_FLIGHT and s.updated_at is not None),
        key=lambda s: s.updated_at,  # type: ignore[arg-type, return-value]
        reverse=True,
    )
    successes = [s for s in finished if s.status == PublishStatus.COMPLETE]
    last_success = successes[0].updated_at if successes else None
    sla = timedelta(minutes=sla_minutes)
    late = [
        s
        for s in in_flight
        if s.created_at is not None
        and (estimates.get(s.partition_key, now) > s.created_at + sla or now > s.created_at + sla)
    ]
    if finished and finished[0].status in ERRORED:
        status: SyncStatus = "failing"
        summary = f"last batch {finished[0].status.value.lower()}"
    elif any(s.status == PublishStatus.HELD for s in finished[:1]):
        status, summary = "held", "waiting for an operator's approval"
    elif late:
        status, summary = "delayed", f"{len(late)} batch(es) behind the {sla_minutes:g} min SLA"
    elif in_flight:
        status, summary = "publishing", f"{len(in_flight)} batch(es) in flight"
    else:
        status, summary = "healthy", "up to date"
    return SourceStatus(
        source=source,
        status=status,
        summary=summary,
        last_success_at=last_success,
        in_flight=[
            BatchLine(
                partition_key=s.partition_key,
                status=s.status,
                entities=s.metrics.entities,
                estimated_completion=estimates.get(s.partition_key),
            )
            for s in in_flight
        ],
        history=[
            BatchLine(
                partition_key=s.partition_key,
                status=s.status,
                finished_at=s.updated_at,
                latency_s=latency_s(s) if s.status == PublishStatus.COMPLETE else None,
                entities=s.metrics.creates + s.metrics.updates + s.metrics.deletes,
            )
            for s in finished[:HISTORY_RUNS]
        ],
    )


# --- HTML ------------------------------------------------------------------------------------

COLORS = {
    "healthy": "#1a7f37",
    "publishing": "#0969da",
    "delayed": "#bf8700",
    "held": "#8250df",
    "failing": "#cf222e",
}
RUN_COLORS = {
    PublishStatus.COMPLETE: "#1a7f37",
    PublishStatus.SUPERSEDED: "#8c959f",
    PublishStatus.SKIPPED: "#8c959f",
    PublishStatus.HELD: "#8250df",
}
CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2328}
h1{margin-bottom:.2rem} .muted{color:#656d76;font-size:.9rem}
.source{border:1px solid #d0d7de;border-radius:8px;padding:1rem;margin:1rem 0}
.badge{display:inline-block;color:#fff;border-radius:1rem;padding:.1rem .7rem;font-size:.85rem}
table{border-collapse:collapse;width:100%;font-size:.85rem}
td,th{text-align:left;padding:.2rem .5rem}
tr:nth-child(even){background:#f6f8fa} .grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "never"


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _history_chart(history: list[BatchLine]) -> str:
    """Latency of the source's last runs, oldest left; bar colour is the run's outcome."""
    runs = list(reversed(history))
    if not runs:
        return '<p class="muted">no finished runs yet</p>'
    width, height, gap = 600, 120, 4
    bar = min(28, max(4, (width - gap * len(runs)) // len(runs)))
    top = max((r.latency_s or 0.0) for r in runs) or 1.0
    bars = []
    for index, run in enumerate(runs):
        value = run.latency_s or 0.0  # runs that did not publish: a short mark in their colour
        h = max(6, int(value / top * (height - 20)))
        color = RUN_COLORS.get(run.status, "#cf222e")
        x = index * (bar + gap)
        bars.append(
            f'<rect x="{x}" y="{height - h}" width="{bar}" height="{h}" fill="{color}">'
            f"<title>{_e(run.partition_key)}: {_e(run.status.value)},"
            f" {_seconds(run.latency_s)}</title></rect>"
        )
    return (
        f'<svg role="img" aria-label="latency of the last runs" width="{width}"'
        f' height="{height}" viewBox="0 0 {width} {height}">{"".join(bars)}'
        f'<text x="0" y="12" font-size="11" fill="#656d76">max {_seconds(top)}</text></svg>'
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An HTML table; cells are escaped (pre-formatted strings and numbers alike)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _source_section(source: SourceStatus) -> str:
    color = COLORS[source.status]
    in_flight = (
        "<h3>In flight</h3>"
        + _table(
            ("batch", "status", "estimated completion"),
            (
                (b.partition_key, b.status.value, _when(b.estimated_completion))
                for b in source.in_flight
            ),
        )
        if source.in_flight
        else ""
    )
    history = _table(
        ("batch", "status", "finished", "landed → published", "changes"),
        (
            (
                b.partition_key,
                b.status.value,
                _when(b.finished_at),
                _seconds(b.latency_s),
                b.entities,
            )
            for b in source.history[:10]
        ),
    )
    return f"""
<section class="source" data-source="{_e(source.source)}" data-status="{source.status}">
  <h2>{_e(source.source)} <span class="badge" style="background:{color}">{source.status}</span></h2>
  <p>{_e(source.summary)} · last successful publish: <b>{_when(source.last_success_at)}</b></p>
  {in_flight}
  <h3>Last runs</h3>
  {_history_chart(source.history)}
  {history}
</section>"""


def _trend_section(document: StatusDocument) -> str:
    t = document.trends
    daily = _table(
        ("day", "batches", "errors", "p50 latency", "entities"),
        ((d.day, d.batches, d.errors, _seconds(d.latency_p50_s), d.entities) for d in t.daily),
    )
    reliability = _table(
        ("source", "succeeded", "rate"),
        (
            (
                r.source,
                f"{r.succeeded}/{r.finished}",
                "–" if r.success_rate is None else f"{r.success_rate:.0%}",
            )
            for r in t.reliability
        ),
    )
    slope = (
        f"{t.seconds_per_1k_entities:.2f} s per 1,000 changed entities"
        if t.seconds_per_1k_entities is not None
        else "not enough runs yet"
    )
    return f"""
<section id="analysis"><h2>Historical analysis</h2><div class="grid">
<div><h3>Publish performance by day</h3>{daily}</div>
<div><h3>Source reliability</h3>{reliability}
<h3>Volume against publish time</h3><p>{slope}</p>{_scatter(document)}</div>
</div></section>"""


def _scatter(document: StatusDocument) -> str:
    points = document.trends.volume_vs_time
    if not points:
        return ""
    width, height = 360, 160
    top_x = max(p.entities for p in points) or 1
    top_y = max(p.publish_s for p in points) or 1.0
    dots = "".join(
        f'<circle cx="{10 + p.entities / top_x * (width - 20):.1f}"'
        f' cy="{height - 10 - p.publish_s / top_y * (height - 20):.1f}" r="3" fill="#0969da">'
        f"<title>{_e(p.partition_key)}: {p.entities} entities, {p.publish_s:.2f} s</title></circle>"
        for p in points
    )
    return (
        f'<svg role="img" aria-label="publish time against volume" width="{width}"'
        f' height="{height}">{dots}</svg>'
    )


def render_html(document: StatusDocument) -> str:
    q = document.queue
    sources = "".join(_source_section(s) for s in document.sources) or "<p>No batches yet.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Metadata publish status</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>Metadata publish status</h1>
<p class="muted">Generated {_when(document.generated_at)} · SLA {document.sla_minutes:g} min from
landing to published · <a href="status.json">status.json</a></p>
<section id="queue"><h2>Queue</h2><p>{q.depth} batch(es) in flight, {q.held} held ·
oldest {_seconds(q.oldest_pending_age_s)} · {q.batches_per_hour:.1f} batches/h ·
{q.entities_per_hour:,.0f} entities/h · p50 {_seconds(q.latency_p50_s)},
p95 {_seconds(q.latency_p95_s)} · error rate
{"–" if q.error_rate is None else f"{q.error_rate:.0%}"}</p></section>
<section id="sources"><h2>Sources</h2>{sources}</section>
{_trend_section(document)}
</body></html>
"""


def publish_status_page(
    state: StateStore, states: Sequence[PublishState], now: datetime, sla_minutes: float
) -> str:
    """Render and store the page and its JSON in the state store; returns the page's URL."""
    document = status_document(states, now, sla_minutes)
    document_key = state.location.key(STATUS_FOLDER, DOCUMENT_NAME)
    state.put_bytes(document_key, document.model_dump_json(indent=2).encode())
    page_key = state.location.key(STATUS_FOLDER, PAGE_NAME)
    state.put_bytes(page_key, render_html(document).encode())
    return state.url(page_key)


def read_status_page(state: StateStore) -> dict[str, bytes] | None:
    """The stored page and document by file name, or None if none was generated yet."""
    files = {}
    for name in (PAGE_NAME, DOCUMENT_NAME):
        found = state.get_bytes(state.location.key(STATUS_FOLDER, name))
        if found is None:
            return None
        files[name] = found[0]
    return files
