"""Tier 3 and crash-resume with the real daemon: the run worker is killed (kill -9) mid-publish.

The `dead_run_workers` sensor notices the worker is gone and fails the run; Dagster's run retries
(dagster.yaml) launch it again; the publish resumes from its chunk checkpoints and completes with
the catalog equal to the batch: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterEventType

from publish_platform.demo import write_run
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.publish_state import PublishStatus
from publish_platform.runtime import running_platform, wait_for_state
from publish_platform_tests.commands import run_cli
from publish_platform_tests.support import SOURCE, entity, identities

pytestmark = pytest.mark.slow


def _big_batch(tables: int = 250, columns: int = 19) -> list[dict]:
    entities = [entity("Database", "db"), entity("Schema", "db/s")]
    for t in range(tables):
        entities.append(entity("Table", f"db/s/t{t}"))
        entities.extend(entity("Column", f"db/s/t{t}/c{c}") for c in range(columns))
    return entities


def _worker_pid(instance, run_id: str) -> int | None:
    for record in instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT
    ).records:
        entry = record.event_log_entry
        if entry.message and entry.message.startswith("Started process for run"):
            return int(entry.dagster_event.engine_event_data.metadata["pid"].value)
    return None


def test_a_killed_run_worker_is_retried_and_resumes(tmp_path: Path, moto_endpoint: str) -> None:
    entities = _big_batch()  # 5002 entities, 101 chunks of 50
    run = write_run(tmp_path / "batch", "test", "wf", str(uuid.uuid4()), {"all": entities})
    extra = {"PUBLISH_PLATFORM_CHUNK_SIZE": "50"}
    with running_platform(tmp_path, moto_endpoint, extra_env=extra) as platform:
        env, instance = platform.env, platform.instance
        run_cli("land", str(run.root), env=env)
        state_bucket, state_prefix = env["PUBLISH_PLATFORM_STATE"][5:].split("/", 1)
        from publish_platform.local_s3 import s3_client

        s3 = s3_client(moto_endpoint)
        checkpoints = f"{state_prefix}batches/{run.partition_key}/publish/"
        deadline = time.monotonic() + 180
        first_run = None
        while time.monotonic() < deadline:
            listed = s3.list_objects_v2(Bucket=state_bucket, Prefix=checkpoints).get("KeyCount", 0)
            if listed >= 5:
                runs = instance.get_runs()
                first_run = runs[-1] if runs else None
                break
            time.sleep(0.2)
        assert first_run is not None, "the publish never got going"
        pid = _worker_pid(instance, first_run.run_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # mid-publish: some chunks done, most not

        state = wait_for_state(
            instance, platform.landing, run.partition_key, {PublishStatus.COMPLETE}, timeout=240
        )
        assert state.dagster_run_id != first_run.run_id
        assert instance.get_run_by_id(first_run.run_id).status.value == "FAILURE"
        retry = instance.get_run_by_id(state.dagster_run_id)
        assert retry.tags.get("dagster/parent_run_id") == first_run.run_id  # Dagster's run retry
        publish = instance.get_latest_materialization_event(
            AssetKey("publish")
        ).asset_materialization
        assert publish.metadata["resumed"].value > 0  # it did not start again from zero

        catalog = SqlCatalog(env["PUBLISH_PLATFORM_METASTORE"])
        try:
            dumped = [
                (e["typeName"], e["attributes"]["qualifiedName"]) for e in catalog.dump(SOURCE)
            ]
            assert len(dumped) == len(set(dumped)) == len(entities)
            assert set(dumped) == identities(entities)
        finally:
            catalog.close()
