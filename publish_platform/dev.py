"""``publish-platform dev``: the whole platform on one machine, with demo batches flowing.

moto server on 127.0.0.1 as the S3 API, Dagster webserver + daemon on SQLite in a local home,
the local SQLite catalog, and demo workflow runs landed: the seed sample, the real fixture run,
then (once that is published) a changed run of the same source. With ``--atlan`` the batches go
to Atlan through pyatlan: the local Atlas-compatible server (with a fresh API key that is never
shown), unless ATLAN_BASE_URL / ATLAN_API_KEY name a real tenant.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time
from pathlib import Path

from publish_platform.config import load_settings
from publish_platform.demo import (
    changed_run,
    fixture_root,
    fixture_run_folder,
    partition_key_of,
    seed_sample_run,
)
from publish_platform.local_atlas import LocalAtlas
from publish_platform.local_s3 import (
    LOCAL_CREDENTIALS,
    ensure_bucket,
    notify_landing_queue,
    s3_client,
    start_moto_server,
    upload_tree,
)
from publish_platform.runtime import start_dagster, write_instance_yaml

DEMO_SETTLE_SECONDS = "5"
DEMO_SENSOR_INTERVAL = "5"


def run_dev(
    webserver_port: int, s3_port: int, demo: bool = True, atlas_port: int | None = None
) -> int:
    home = Path(os.environ.get("PUBLISH_PLATFORM_HOME", ".publish_platform")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    dagster_home = Path(os.environ.get("DAGSTER_HOME", home / "dagster")).resolve()
    env = {
        **LOCAL_CREDENTIALS,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "DAGSTER_HOME": str(dagster_home),
        "PUBLISH_PLATFORM_HOME": str(home),
        "PUBLISH_PLATFORM_SETTLE_SECONDS": os.environ.get(
            "PUBLISH_PLATFORM_SETTLE_SECONDS", DEMO_SETTLE_SECONDS
        ),
        "PUBLISH_PLATFORM_SENSOR_INTERVAL_SECONDS": os.environ.get(
            "PUBLISH_PLATFORM_SENSOR_INTERVAL_SECONDS", DEMO_SENSOR_INTERVAL
        ),
    }
    atlas = None
    if atlas_port is not None:
        env["PUBLISH_PLATFORM_METASTORE"] = "atlan"
        if not os.environ.get("ATLAN_BASE_URL"):
            atlas = LocalAtlas(atlas_port, api_key=secrets.token_urlsafe(24)).__enter__()
            env.update({"ATLAN_BASE_URL": atlas.url, "ATLAN_API_KEY": atlas.store.api_key or ""})
    os.environ.update(env)
    settings = load_settings()
    # moto keeps S3 in memory, so the state store starts empty: start the catalog and the
    # Dagster instance afresh too, or they would describe batches the state store never saw.
    if settings.metastore_kind == "sql" and not settings.metastore:
        Path(settings.metastore_url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    if dagster_home.is_relative_to(home):  # never a DAGSTER_HOME the user pointed elsewhere
        shutil.rmtree(dagster_home, ignore_errors=True)
    write_instance_yaml(dagster_home, storage="sqlite")

    log_dir = home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "moto.log", "ab") as moto_log:
        moto = start_moto_server(s3_port, moto_log)
        dagster = None
        try:
            s3 = s3_client()
            ensure_bucket(s3, settings.landing_location.bucket)
            ensure_bucket(s3, settings.state_location.bucket)
            if not settings.landing_queue_url:  # the sensor follows the bucket's notifications
                queue_url = notify_landing_queue(
                    s3, settings.landing_location.bucket, "publish-landing-events"
                )
                env["PUBLISH_PLATFORM_LANDING_QUEUE_URL"] = queue_url
                os.environ["PUBLISH_PLATFORM_LANDING_QUEUE_URL"] = queue_url
            print(f"S3 API (moto)   {env['AWS_ENDPOINT_URL']}")
            print(f"landing         {settings.landing_location}  (events: SQS, same endpoint)")
            print(f"state           {settings.state_location}")
            print(f"metastore       {settings.metastore_display}")
            print(f"DAGSTER_HOME    {dagster_home}")
            dagster = start_dagster(env, webserver_port, log_dir)
            print(f"Dagster UI      {dagster.url}   (logs in {log_dir}; Ctrl-C stops)")
            if demo:
                _land_demo(s3, settings, dagster_home)
            _wait_for_signal()
        finally:
            if dagster is not None:
                dagster.stop()
            moto.terminate()
            moto.wait(timeout=30)
            if atlas is not None:
                atlas.__exit__()
    return 0


def _land_demo(s3: object, settings: object, dagster_home: Path) -> None:
    from dagster import DagsterInstance

    from publish_platform.publish_state import PublishStatus, derive_states

    landing = settings.landing_location  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as scratch:
        seed = seed_sample_run(Path(scratch) / "seed")
        upload_tree(s3, seed.root, landing.bucket, landing.prefix)
        print(f"landed demo run {seed.partition_key} (seed sample)")
        upload_tree(s3, fixture_root(), landing.bucket, landing.prefix)
        first_key = partition_key_of(fixture_run_folder())
        print(f"landed demo run {first_key} (real SDK run of a PostgreSQL source)")

        instance = DagsterInstance.from_config(str(dagster_home))
        deadline = time.monotonic() + 300
        status = None
        while time.monotonic() < deadline:
            if first_key in instance.get_dynamic_partitions("workflow_runs"):
                status = derive_states(instance, settings.landing, [first_key])[0].status  # type: ignore[attr-defined]
                if status not in (
                    PublishStatus.PENDING,
                    PublishStatus.PLANNING,
                    PublishStatus.PLAN_COMPLETE,
                    PublishStatus.EXECUTING,
                ):
                    break
            time.sleep(2)
        print(f"{first_key}: {status}")
        changed = changed_run(Path(scratch) / "changed")
        upload_tree(s3, changed.root, landing.bucket, landing.prefix)
        print(f"landed demo run {changed.partition_key} (same source: added, changed, removed)")


def _wait_for_signal() -> None:
    """Until SIGTERM or SIGINT (Ctrl-C). SIGINT is handled explicitly: a process started in the
    background by a non-interactive shell inherits it ignored, and Ctrl-C sent to its process
    group then did nothing."""
    stop = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop:
        time.sleep(1)
