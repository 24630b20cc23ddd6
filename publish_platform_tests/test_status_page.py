"""Monitoring and the status page over real batches: the monitoring job's observation and page,
``status --json`` queue metrics, and the served page opened in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from dagster import DagsterEventType, DagsterInstance, EventRecordsFilter

from publish_platform.config import Settings
from publish_platform.landing import RunRef
from publish_platform.local_s3 import free_port
from publish_platform_tests.commands import run_cli
from publish_platform_tests.support import (
    UPSTREAM_RUN,
    UPSTREAM_SOURCE,
    land,
    manifest_for,
    upstream_files,
)

BROKEN_SOURCE = "default/postgres/999"


@pytest.fixture
def history(settings: Settings, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two sources drained through the real job: one published, one quarantined (bad sha256)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    run_cli("land", str(UPSTREAM_RUN))
    broken = RunRef("postgres", "other-extract", "33333333-3333-4333-8333-333333333333")
    files = upstream_files()
    files["transformed/table/entities.json"] += b"\n"  # the sidecar no longer matches
    land(s3, settings.landing_location, broken, files, manifest_for(broken, BROKEN_SOURCE))
    drained = run_cli("drain", check=False)
    assert "COMPLETE" in drained.stdout and "QUARANTINED" in drained.stdout, drained.stdout
    return tmp_path


def test_the_monitoring_job_and_status_json_report_the_queue(history: Path, state):
    """One history for both readers of the queue: the monitoring job (its observation and the
    page it writes) and ``status --json``."""
    from publish_platform.defs import defs
    from publish_platform.status_page import read_status_page

    instance = DagsterInstance.get()
    try:
        result = defs.get_job_def("monitor_publishing").execute_in_process(instance=instance)
        assert result.success
        [record] = instance.get_event_records(
            EventRecordsFilter(DagsterEventType.ASSET_OBSERVATION, asset_key=None), limit=1
        )
        metadata = record.event_log_entry.dagster_event.asset_observation_data.asset_observation
        values = {k: v.value for k, v in metadata.metadata.items()}
    finally:
        instance.dispose()
    assert values["depth"] == 0 and values["batches_per_hour"] == 1
    assert values["error_rate"] == 0.5  # one of the two finished batches was quarantined
    assert values["latency_p50_s"] > 0

    files = read_status_page(state)
    document = orjson.loads(files["status.json"])
    statuses = {s["source"]: s["status"] for s in document["sources"]}
    assert statuses == {UPSTREAM_SOURCE: "healthy", BROKEN_SOURCE: "failing"}

    status = orjson.loads(run_cli("status", "--json").stdout)
    assert status["queue"]["depth"] == 0 and status["queue"]["error_rate"] == 0.5
    assert {b["status"] for b in status["batches"]} == {"COMPLETE", "QUARANTINED"}
    complete = next(b for b in status["batches"] if b["status"] == "COMPLETE")
    assert complete["metrics"]["latency_s"] > 0 and complete["metrics"]["queue_wait_s"] >= 0
    assert complete["metrics"]["snapshot_relationships"] > 0


def test_the_served_page_in_headless_chromium(history: Path):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (make setup-browser installs it)"
    out = history / "page"
    run_cli("status-page", "--now", "--out", str(out))
    assert (out / "index.html").exists() and (out / "status.json").exists()

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "publish_platform.cli",
            "status-page",
            "--serve",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url)
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={history / 'chromium-profile'}",
        ]
        dom = subprocess.run(
            [chromium, *flags, "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        screenshot = history / "status-page.png"
        subprocess.run(
            [chromium, *flags, f"--screenshot={screenshot}", "--window-size=1280,1600", url],
            capture_output=True,
            timeout=120,
            check=True,
        )
    finally:
        server.terminate()
        server.wait(timeout=10)

    found = dict(re.findall(r'data-source="([^"]+)" data-status="([^"]+)"', dom))
    assert found == {UPSTREAM_SOURCE: "healthy", BROKEN_SOURCE: "failing"}
    assert "Historical analysis" in dom and "<svg" in dom
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def _wait_until_served(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_the_alert_sensor_sends_a_queue_build_up_once(
    history: Path, webhook, monkeypatch: pytest.MonkeyPatch
):
    from dagster import build_sensor_context

    from publish_platform.defs import defs

    url, received = webhook
    monkeypatch.setenv("PUBLISH_PLATFORM_ALERT_WEBHOOK", url)
    monkeypatch.setenv("PUBLISH_PLATFORM_ALERT_QUEUE_DEPTH", "1")
    # A republish queued with no daemon to start it: one batch in flight.
    key = RunRef("postgres", "pg-local-extract", "11111111-1111-4111-8111-111111111111")
    run_cli("republish", key.partition_key, "--no-wait")

    sensor = defs.get_sensor_def("publish_alerts")
    instance = DagsterInstance.get()
    try:
        first = build_sensor_context(instance=instance, resources=defs.resources)
        sensor(first)
        second = build_sensor_context(
            instance=instance, cursor=first.cursor, resources=defs.resources
        )
        sensor(second)
    finally:
        instance.dispose()
    assert [a["kind"] for a in received] == ["queue_buildup"]
    assert "1 batches in flight" in received[0]["summary"]
    assert received[0]["details"]["depth_by_source"] == {UPSTREAM_SOURCE: 1}
