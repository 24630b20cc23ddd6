"""End to end on Atlan: sensor → diff → plan → publish in the real daemon, through pyatlan's
client, against the local Atlas-compatible server (whose request log is what Atlan would see).

1. The fixture run, hit by a 429 whose Retry-After is longer than a step waits: tier 2 retries
   the step no sooner than Retry-After, and it completes. A changed run then lands creates,
   updates, archives and relationship changes in ceil(N / batch size) mutation requests with no
   per-entity look-up; a volatile-only run sends no mutation request at all.
2. Four sources publish at once through a 429 storm and a tenant limit: the shared budget is
   never exceeded, every cool-down pauses every worker, and no entity is lost or duplicated.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import pytest

from publish_platform.config import S3Location
from publish_platform.defs.failures import retry_history
from publish_platform.demo import (
    changed_run,
    fixture_root,
    fixture_run_folder,
    partition_key_of,
    read_run_entities,
    resynced_run,
)
from publish_platform.landing import RunRef
from publish_platform.local_atlas import Fault, LocalAtlas, RateLimit
from publish_platform.local_s3 import s3_client
from publish_platform.publish_state import PublishStatus
from publish_platform.runtime import running_platform, wait_for_state
from publish_platform.state import StateStore
from publish_platform_tests.commands import run_cli
from publish_platform_tests.conftest import ATLAN_TEST_KEY
from publish_platform_tests.support import (
    bucket_objects,
    entity,
    files_under,
    identity,
    jsonl,
    land,
    manifest_for,
    planted_secrets_in,
    with_sidecars,
)

pytestmark = pytest.mark.slow

BULK = "/api/meta/entity/bulk/"


def _mutations(atlas: LocalAtlas) -> list[Any]:
    return [r for r in atlas.store.requests() if r.path == BULK and r.method in ("POST", "DELETE")]


def _atlan_env(atlas: LocalAtlas, **settings: str) -> dict[str, str]:
    return {
        "ATLAN_BASE_URL": atlas.url,
        "ATLAN_API_KEY": ATLAN_TEST_KEY,
        **{f"PUBLISH_PLATFORM_{name.upper()}": value for name, value in settings.items()},
    }


def test_the_pipeline_publishes_to_atlan_through_pyatlan(tmp_path: Path, moto_endpoint: str):
    batch = 10
    with LocalAtlas(api_key=ATLAN_TEST_KEY) as atlas:
        env = _atlan_env(
            atlas,
            chunk_size=str(batch),
            atlan_max_inline_wait_seconds="0.5",
            retry_delay_scale="0.01",
        )
        with running_platform(tmp_path, moto_endpoint, "atlan", extra_env=env) as platform:
            # 1. The fixture run; its first upsert is throttled for longer than a step waits.
            atlas.store.add_fault(Fault(429, retry_after=3, method="POST", path_contains="bulk"))
            run_cli("land", str(fixture_root()), env=platform.env)
            first_key = partition_key_of(fixture_run_folder())
            first = wait_for_state(platform.instance, platform.landing, first_key)
            assert first.status == PublishStatus.COMPLETE, first.failure_details
            fixture = [e for rows in read_run_entities(fixture_run_folder()).values() for e in rows]
            assert {identity(e) for e in atlas.store.dump()} == {identity(e) for e in fixture}

            log = _mutations(atlas)
            assert log[0].status == 429 and all(r.status == 200 for r in log[1:])
            assert log[1].at - log[0].at >= 3.0  # tier 2 waited at least Retry-After
            assert len(log[1:]) == math.ceil(len(fixture) / batch)
            tiers = [a.tier for a in retry_history(platform.instance, first_key)]
            assert "delayed" in tiers, tiers

            # Guids from Atlan's answers are in the snapshot.
            source = first.source_id
            state = StateStore(
                s3_client(moto_endpoint), S3Location.parse(platform.env["PUBLISH_PLATFORM_STATE"])
            )
            pointer = state.current_pointer(source)
            snapshot = state.read_snapshot(source, pointer.serial)
            stored = {identity(e): e["guid"] for e in atlas.store.dump()}
            assert {
                (t, q): g
                for t, q, g in snapshot.select("type_name", "qualified_name", "guid").iter_rows()
            } == stored

            # 2. A changed run: creates, updates, archives, relationship changes.
            atlas.store.clear_requests()
            second = changed_run(tmp_path / "second")
            run_cli("land", str(second.root), env=platform.env)
            changed = wait_for_state(platform.instance, platform.landing, second.partition_key)
            assert changed.status == PublishStatus.COMPLETE, changed.failure_details
            metrics = changed.metrics
            assert metrics.creates and metrics.updates and metrics.deletes
            upserts, deletes = metrics.creates + metrics.updates, metrics.deletes
            calls = [(r.method, r.entities) for r in _mutations(atlas)]
            assert calls == [("POST", upserts), ("DELETE", deletes)]  # ceil(N / 10) each
            assert not [
                r for r in atlas.store.requests() if r.method == "GET"
            ]  # no per-entity look-up

            active = {identity(e): e for e in atlas.store.dump()}
            assert set(active) == {identity(e) for e in second.entities}
            archived = {identity(e) for e in atlas.store.dump(include_archived=True)} - set(active)
            assert len(archived) == deletes  # archived (soft-deleted), not purged
            added_column = next(
                e
                for e in active.values()
                if e["attributes"]["qualifiedName"].endswith("demo_added_table/id")
            )
            added_table = active[("Table", added_column["attributes"]["tableQualifiedName"])]
            assert added_column["attributes"]["table"]["guid"] == added_table["guid"]
            described = [
                e
                for e in active.values()
                if str(e["attributes"].get("description", "")).startswith("Changed by the demo")
            ]
            assert len(described) == 2

            # 3. Only volatile attributes changed: zero mutation requests.
            atlas.store.clear_requests()
            third = resynced_run(tmp_path / "third", second)
            run_cli("land", str(third.root), env=platform.env)
            resynced = wait_for_state(platform.instance, platform.landing, third.partition_key)
            assert resynced.status == PublishStatus.COMPLETE, resynced.failure_details
            assert _mutations(atlas) == []

            # The API key is in no file the platform wrote (event log, compute logs, process
            # logs) and in no object of the state store.
            # (test_security plants every other secret too, on the in-process path.)
            bucket = S3Location.parse(platform.env["PUBLISH_PLATFORM_STATE"]).bucket
            objects = bucket_objects(s3_client(moto_endpoint), bucket)
            places = {
                **files_under(tmp_path),
                **{f"state object {k}": v for k, v in objects.items()},
            }
            assert planted_secrets_in({"ATLAN_API_KEY": ATLAN_TEST_KEY}, places) == []


def _source_entities(source: str) -> list[dict]:
    """Database, schema, 6 tables of 5 columns: 38 entities."""
    entities = [entity("Database", "db", source), entity("Schema", "db/s", source)]
    for table in range(6):
        entities.append(entity("Table", f"db/s/t{table}", source))
        entities.extend(entity("Column", f"db/s/t{table}/c{c}", source) for c in range(5))
    return entities


def test_a_429_storm_across_concurrent_runs_keeps_the_budget_and_loses_nothing(
    tmp_path: Path, moto_endpoint: str
):
    budget, window = 12, 2.0
    with LocalAtlas(api_key=ATLAN_TEST_KEY) as atlas:
        # Atlan's side: the tenant limit, a little above the budget the platform is given.
        atlas.store.set_rate_limit(RateLimit(budget=15, window_s=window, block_s=1.0))
        # A storm: the next eight mutation requests are throttled whoever sends them.
        atlas.store.add_fault(Fault(429, count=8, retry_after=1.5, path_contains="bulk"))
        env = _atlan_env(
            atlas,
            chunk_size="5",
            atlan_request_budget=str(budget),
            atlan_budget_window_seconds=str(window),
            atlan_throttle_retries="20",
        )
        with running_platform(tmp_path, moto_endpoint, "atlan", extra_env=env) as platform:
            s3 = s3_client(moto_endpoint)
            landing = S3Location.parse(platform.landing)
            sources = [f"default/postgres/{100 + n}" for n in range(4)]
            keys = []
            for n, source in enumerate(sources):
                run = RunRef("postgres", f"storm-{n}", str(uuid.uuid4()))
                files = with_sidecars(
                    {"transformed/entities/entities.json": jsonl(_source_entities(source))}
                )
                land(s3, landing, run, files, manifest_for(run, source))
                keys.append(run.partition_key)
            states = [
                wait_for_state(platform.instance, platform.landing, key, timeout=300)
                for key in keys
            ]

    assert [s.status for s in states] == [PublishStatus.COMPLETE] * 4, [
        s.failure_details for s in states
    ]
    expected = {identity(e) for source in sources for e in _source_entities(source)}
    dumped = [identity(e) for e in atlas.store.dump()]
    assert len(dumped) == len(set(dumped)) and set(dumped) == expected  # none lost, none twice

    log = atlas.store.requests()
    jitter = 0.3  # the server stamps a request when its handler thread runs: up to this late
    throttled = [r for r in log if r.status == 429]
    assert len(throttled) == 8 and all(
        r.fault == "fault" for r in throttled
    )  # tenant limit never hit
    # Every cool-down paused every worker: nothing was sent before its Retry-After was over
    # (requests already on the wire when the 429 was answered, or stamped late by the server,
    # come within the jitter).
    for refusal in throttled:
        assert not [r for r in log if refusal.at + jitter < r.at < refusal.at + 1.49], refusal
    # The platform's budget held: never more than 12 requests in any 2-second window. The
    # server stamps a request when its handler thread runs, up to a few hundred ms late while
    # this process is busy polling: windows are shortened by that much.
    times = sorted(r.at for r in log)
    assert (
        max(sum(1 for t in times if start <= t < start + window - jitter) for start in times)
        <= budget
    )
