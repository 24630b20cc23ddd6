"""Crash-resume: a publish killed with SIGKILL mid-way and run again finishes with no duplicate
and no lost entity, resuming from its per-chunk checkpoints instead of starting from zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from publish_platform.config import load_settings
from publish_platform.landing import RunRef
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.pipeline import publish_with_replan, run_diff, run_plan, run_publish

from .support import SOURCE, catalog_identities, entity, identities, land_batch

RUN = RunRef("test", "wf", "run-big")
CHUNK = 50

# The publish step as a process of its own, against a catalog slow enough to be killed mid-way.
PUBLISH_SCRIPT = textwrap.dedent(
    """
    import sys
    import time

    from publish_platform.config import load_settings
    from publish_platform.local_s3 import s3_client
    from publish_platform.metastores.sql import SqlCatalog
    from publish_platform.pipeline import run_publish
    from publish_platform.state import StateStore


    class SlowCatalog(SqlCatalog):
        def upsert(self, writes):
            time.sleep(0.05)
            return super().upsert(writes)


    settings = load_settings()
    state = StateStore(s3_client(), settings.state_location)
    run_publish(state, settings, SlowCatalog(settings.metastore_url), sys.argv[1])
    """
)


def two_thousand() -> list[dict]:
    entities = [entity("Database", "db"), entity("Schema", "db/s")]
    entities += [entity("Table", f"db/s/t{t:02d}") for t in range(40)]
    entities += [entity("Column", f"db/s/t{i % 40:02d}/c{i:04d}") for i in range(1958)]
    return entities


class CountingCatalog(SqlCatalog):
    """The catalog, counting the entities each upsert is sent."""

    written = 0

    def upsert(self, writes):
        self.written += len(writes)
        return super().upsert(writes)


def keys_under(s3, bucket: str, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_publish_killed_mid_way_resumes_with_no_duplicate_and_none_lost(
    s3, state, settings, monkeypatch, tmp_path
):
    monkeypatch.setenv("PUBLISH_PLATFORM_CHUNK_SIZE", str(CHUNK))
    settings = load_settings()
    assert settings.chunk_size == CHUNK
    batch = two_thousand()
    land_batch(s3, settings, RUN, batch)
    key = RUN.partition_key
    run_diff(s3, state, settings, key)
    _, plan, checks = run_plan(state, settings, key)
    assert plan.header.creates == 2000 and all(c.passed for c in checks)
    bucket = settings.state_location.bucket
    checkpoints = state.batch_key(key, f"publish/{plan.header.plan_id}/")

    log = tmp_path / "publish.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", PUBLISH_SCRIPT, key], stdout=output, stderr=output
        )
    try:
        deadline = time.monotonic() + 60
        while len(keys_under(s3, bucket, checkpoints)) < 3:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the publish never checkpointed 3 chunks"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    done = len(keys_under(s3, bucket, checkpoints))
    assert 3 <= done < 2000 // CHUNK  # killed mid-way
    assert state.current_serial(SOURCE) == 0 and state.read_pointer(SOURCE) is None
    catalog = CountingCatalog(settings.metastore_url)
    try:
        partial = catalog_identities(catalog)
        assert done * CHUNK <= len(partial) <= (done + 1) * CHUNK  # at most one unrecorded chunk

        # The job is run again: diff and plan are recomputed, on the same serial, to the same
        # plan, whose checkpoints the publish then finds.
        run_diff(s3, state, settings, key)
        _, again, _ = run_plan(state, settings, key, catalog)
        assert again.header.plan_id == plan.header.plan_id
        result = run_publish(state, settings, catalog, key)

        assert result.outcome == "published" and result.serial == 1
        assert (result.succeeded, result.failed) == (2000, 0)
        assert result.resumed == done * CHUNK  # not restarted from zero
        assert catalog.written == 2000 - result.resumed
        # The catalog equals the batch: every entity once, none lost. A chunk that was applied
        # but not yet checkpointed when the kill came is applied again, harmlessly.
        assert catalog_identities(catalog) == identities(batch)
        versions = catalog.versions(SOURCE)
        assert len(versions) == 2000 and set(versions.values()) <= {1, 2}
        assert sum(v - 1 for v in versions.values()) <= CHUNK
        # The pointer advanced once; the snapshot is the catalog.
        assert [p.serial for p in state.history(SOURCE)] == [1]
        snapshot = state.read_snapshot(SOURCE, 1)
        assert snapshot.height == 2000
        in_catalog = {
            (e["typeName"], e["attributes"]["qualifiedName"], e["guid"]) for e in catalog.dump()
        }
        assert set(snapshot.select("type_name", "qualified_name", "guid").rows()) == in_catalog
        snapshots = state.source_key(SOURCE, "snapshots/")
        assert len(keys_under(s3, bucket, snapshots)) == 1  # one candidate, committed

        # Run once more (Dagster retried the step after all): refused as stale, re-planned on
        # serial 1, nothing left to do; nothing written.
        written = catalog.written
        rerun = publish_with_replan(s3, state, settings, catalog, key)
        assert rerun.replanned and rerun.outcome == "nothing_to_publish" and rerun.serial == 1
        assert catalog.written == written and catalog.versions(SOURCE) == versions
        assert state.current_serial(SOURCE) == 1
    finally:
        catalog.close()
