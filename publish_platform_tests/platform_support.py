"""A running platform for end-to-end tests: moto S3, dagster-webserver and dagster-daemon."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import DagsterInstance

from publish_platform.local_s3 import LOCAL_CREDENTIALS, ensure_bucket, free_port, s3_client
from publish_platform.publish_state import PublishStatus, derive_states
from publish_platform.runtime import start_dagster, write_instance_yaml

SETTLED = {
    PublishStatus.SUPERSEDED,
    PublishStatus.COMPLETE,
    PublishStatus.FAILED,
    PublishStatus.HELD,
    PublishStatus.QUARANTINED,
    PublishStatus.SKIPPED,
}


@dataclass
class RunningPlatform:
    env: dict[str, str]
    instance: DagsterInstance
    url: str

    @property
    def landing(self) -> str:
        return self.env["PUBLISH_PLATFORM_LANDING"]


@contextmanager
def running_platform(
    tmp_path: Path,
    moto_endpoint: str,
    metastore: str | None = None,
    dagster_postgres_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningPlatform]:
    suffix = uuid.uuid4().hex[:8]
    home = tmp_path / "home"
    dagster_home = home / "dagster"
    env = {
        **LOCAL_CREDENTIALS,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "DAGSTER_HOME": str(dagster_home),
        "PUBLISH_PLATFORM_HOME": str(home),
        "PUBLISH_PLATFORM_LANDING": f"s3://land-{suffix}/runs/",
        "PUBLISH_PLATFORM_STATE": f"s3://state-{suffix}/publish/",
        "PUBLISH_PLATFORM_SETTLE_SECONDS": "1",
        "PUBLISH_PLATFORM_SENSOR_INTERVAL_SECONDS": "1",
        "PUBLISH_PLATFORM_METASTORE": metastore or f"sqlite:///{home / 'catalog.sqlite'}",
        **(extra_env or {}),
    }
    if dagster_postgres_url:
        env["DAGSTER_POSTGRES_URL"] = dagster_postgres_url
    write_instance_yaml(dagster_home, storage="postgres" if dagster_postgres_url else "sqlite")
    s3 = s3_client(moto_endpoint)
    ensure_bucket(s3, f"land-{suffix}")
    ensure_bucket(s3, f"state-{suffix}")

    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    processes = start_dagster(env, free_port(), tmp_path / "logs")
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        yield RunningPlatform(env, instance, processes.url)
    finally:
        instance.dispose()
        processes.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_state(
    instance: DagsterInstance,
    landing: str,
    key: str,
    statuses: set[PublishStatus] = SETTLED,
    timeout: float = 240,
    dead_letters: Any = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if key in instance.get_dynamic_partitions("workflow_runs"):
            dead = dead_letters() if dead_letters else None
            state = derive_states(instance, landing, [key], dead_letters=dead)[0]
            if state.status in statuses:
                return state
        time.sleep(1)
    raise AssertionError(f"{key} did not reach {sorted(statuses)} within {timeout}s")
