"""Retry tiers and the dead-letter queue with the real daemon: a catalog that stays down.

The batch's steps are retried by tier 2 (op retries, delays scaled down); the failed run is then
re-launched once by tier 3, the relaunch schedule (every minute here); when that
fails too the failure is final, and the dead-letter sensor dead-letters the batch with every
attempt in its history and alerts exactly once. Once the catalog is back, `dlq requeue` sends the
batch through the queue again and it completes with the catalog correct.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from publish_platform.demo import (
    fixture_root,
    fixture_run_folder,
    partition_key_of,
    read_run_entities,
)
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.publish_state import PublishStatus
from publish_platform.runtime import running_platform, wait_for_state
from publish_platform_tests.commands import run_cli

pytestmark = pytest.mark.slow


def test_a_metastore_that_stays_down_ends_in_the_dlq_and_requeue_completes_it(
    tmp_path: Path, moto_endpoint: str, own_postgres, webhook
) -> None:
    url, alerts = webhook
    catalog_url = own_postgres.create_database("catalog")
    own_postgres.stop()  # the metastore is down before the batch arrives, and stays down
    extra_env = {
        "PUBLISH_PLATFORM_RETRY_DELAY_SCALE": "0.02",
        "PUBLISH_PLATFORM_SCHEDULED_RELAUNCHES": "1",  # tier 3: the schedule re-launches once
        "PUBLISH_PLATFORM_RELAUNCH_CRON": "* * * * *",
        "PUBLISH_PLATFORM_ALERT_WEBHOOK": url,
    }
    with running_platform(tmp_path, moto_endpoint, catalog_url, extra_env=extra_env) as platform:
        env = platform.env
        key = partition_key_of(fixture_run_folder())
        run_cli("land", str(fixture_root()), env=env)

        def dead_letters() -> dict[str, str]:
            listed = orjson.loads(run_cli("dlq", "list", "--json", env=env).stdout)
            return {e["partition_key"]: e["last_run_id"] for e in listed}

        state = wait_for_state(
            platform.instance,
            platform.landing,
            key,
            {PublishStatus.DEAD_LETTERED},
            dead_letters=dead_letters,
        )
        entry = orjson.loads(run_cli("dlq", "show", key, env=env).stdout)
        assert entry["state"] == "dead" and entry["last_run_id"] == state.dagster_run_id
        assert "OperationalError" in entry["reason"] or "Transient" in entry["reason"], entry
        tiers = [attempt["tier"] for attempt in entry["history"]]
        # The first run: 3 op retries, then its failure (not final: no alert, no dead letter);
        # the schedule's re-launch: 3 op retries again, then the final failure.
        assert tiers == ["delayed"] * 3 + ["initial"] + ["delayed"] * 3 + ["scheduled"], tiers
        relaunched = platform.instance.get_run_by_id(entry["last_run_id"])
        assert relaunched.tags["publish_platform/relaunch"] == "scheduled"
        assert relaunched.tags["dagster/partition"] == key
        assert all(attempt["error"] for attempt in entry["history"])
        listed = orjson.loads(run_cli("status", "--json", env=env).stdout)["batches"]
        assert [s["status"] for s in listed] == ["DEAD_LETTERED"]

        time.sleep(12)  # the failure sensor would have fired again by now if it were going to
        assert len(alerts) == 1, alerts
        assert alerts[0]["kind"] == "dead_letter" and alerts[0]["details"]["partition_key"] == key

        own_postgres.start()  # the metastore is back
        requeued = run_cli("dlq", "requeue", key, env=env)
        assert "SUCCESS" in requeued.stdout, requeued.stdout
        state = wait_for_state(platform.instance, platform.landing, key, {PublishStatus.COMPLETE})
        assert state.metrics.published == 38
        run = platform.instance.get_run_by_id(state.dagster_run_id)
        assert int(run.tags["dagster/priority"]) >= 100_000  # requeued ahead of the queue
        assert orjson.loads(run_cli("dlq", "list", "--json", env=env).stdout) == []
        entry = orjson.loads(run_cli("dlq", "show", key, env=env).stdout)
        assert entry["state"] == "requeued" and entry["requeue_run_id"] == state.dagster_run_id

        catalog = SqlCatalog(catalog_url)
        try:
            expected = {
                (e["typeName"], e["attributes"]["qualifiedName"])
                for rows in read_run_entities(fixture_run_folder()).values()
                for e in rows
            }
            dumped = [(e["typeName"], e["attributes"]["qualifiedName"]) for e in catalog.dump()]
            assert sorted(dumped) == sorted(expected)
        finally:
            catalog.close()
        assert len(alerts) == 1
