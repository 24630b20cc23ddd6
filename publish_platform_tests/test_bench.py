"""The bench command on a small batch: every measurement present, the platform and the naive
baseline find the same changes, and a no-op batch writes nothing. (Speed is reported by the
command, never asserted here.)"""

from __future__ import annotations

import json
from pathlib import Path

from publish_platform_tests.commands import run_cli

KEYS = {
    "entities",
    "parse_floor_s",
    "naive_s",
    "diff_plan_s",
    "ratio_vs_parse_floor",
    "speedup_vs_naive",
    "peak_rss_mb",
    "publish_entities_per_s",
    "publish_peak_rss_mb",
    "noop_writes",
}


def test_bench_reports_every_measurement_and_agrees_with_the_baseline(tmp_path: Path):
    out = tmp_path / "bench.json"
    run_cli(
        "bench",
        "--entities",
        "3000",
        "--changes",
        "0.1",
        "--rounds",
        "2",
        "--sensor-runs",
        "60",
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())

    assert set(result) >= KEYS
    assert result["entities"] == 3000
    changes = result["changes"]
    assert 100 < changes["changed"] < 260 and 20 < changes["added"] < 100
    assert result["plan"]["creates"] == result["naive_found"]["creates"] == changes["added"]
    assert result["plan"]["updates"] == result["naive_found"]["updates"] == changes["changed"]
    assert result["plan"]["deletes"] == result["naive_found"]["deletes"] == changes["deleted"]
    assert result["noop_operations"] == 0 and result["noop_writes"] == 0
    # Each contender measured in every round; the reported time is one of its rounds.
    for phase, key in (
        ("parse_floor", "parse_floor_s"),
        ("naive", "naive_s"),
        ("diff_plan", "diff_plan_s"),
    ):
        assert len(result["rounds_s"][phase]) == 2 and result[key] in result["rounds_s"][phase]
    assert result["publish_entities_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert result["publish_peak_rss_mb"] > 0 and result["publish_snapshot_s"] > 0
    assert result["first_diff_plan_s"] > 0 and result["plan_checks_s"] > 0
    assert result["first_diff_step_peak_rss_mb"] > 0 and result["first_plan_step_peak_rss_mb"] > 0
    assert result["first_plan_checks_s"] > 0
    assert result["diff_step_peak_rss_mb"] > 0 and result["plan_step_peak_rss_mb"] > 0
    tick = result["sensor_tick"]
    assert tick["old_runs"] == 60 and tick["new_runs"] == 10 and tick["deep_listings"] == 10
    assert tick["list_calls"] > 0 and tick["seconds"] > 0
    # Driven by notifications: one deep listing per new run folder, nothing for the history.
    assert tick["events_new_runs"] == 10 and tick["events_list_calls"] == 10
