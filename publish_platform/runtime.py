"""Processes of a running platform: the Dagster instance home, webserver and daemon.

Used by ``publish-platform dev``, the latency benchmark and the end-to-end tests, so all run the
platform the same way production does: ``dagster-webserver`` and ``dagster-daemon`` on
``workspace.yaml``. ``running_platform`` is the whole of it on one machine against an S3 endpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from publish_platform.local_s3 import LOCAL_CREDENTIALS, ensure_bucket, free_port, s3_client
from publish_platform.publish_state import PublishState, PublishStatus, derive_states

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE_YAML = PROJECT_ROOT / "workspace.yaml"
INSTANCE_YAML = PROJECT_ROOT / "dagster.yaml"


def write_instance_yaml(dagster_home: Path, storage: str = "sqlite") -> Path:
    """Install the project's dagster.yaml into a Dagster home.

    ``postgres`` keeps it as documented for production (storage from DAGSTER_POSTGRES_URL);
    ``sqlite`` drops the storage block, so Dagster keeps its SQLite storage in the home.
    """
    config = yaml.safe_load(INSTANCE_YAML.read_text())
    if storage == "sqlite":
        config.pop("storage", None)
    dagster_home.mkdir(parents=True, exist_ok=True)
    target = dagster_home / "dagster.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def dagster_bin(name: str) -> str:
    """A console script of this environment (dagster, dagster-webserver, dagster-daemon)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _start_daemon(env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [dagster_bin("dagster-daemon"), "run", "-w", str(WORKSPACE_YAML)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=PROJECT_ROOT,
    )


@dataclass
class DagsterProcesses:
    webserver: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    url: str
    logs: list[IO[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def stop_daemon(self) -> None:
        """Stop dagster-daemon as an operator would (SIGTERM); runs it queued stay queued."""
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def start_daemon(self) -> None:
        """Start dagster-daemon again (after ``stop_daemon``), logging to the same file."""
        if self.daemon.poll() is None:
            raise RuntimeError("dagster-daemon is still running")
        self.daemon = _start_daemon(self.env, self.logs[1])

    def stop(self) -> None:
        for process in (self.daemon, self.webserver):
            if process.poll() is None:
                process.terminate()
        for process in (self.daemon, self.webserver):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in self.logs:
            log.close()


def start_dagster(env: dict[str, str], port: int, log_dir: Path) -> DagsterProcesses:
    """Start dagster-webserver (127.0.0.1:port) and dagster-daemon; wait for the webserver."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env}
    # Create the instance's storage once, before the processes: left to the webserver, the
    # daemon and whoever opens the instance next, SQLite storage can be created by two of them
    # at once, which stamps its migration table twice ("more than one head present").
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from dagster import DagsterInstance; DagsterInstance.get().dispose()",
        ],
        env=full_env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    web_log = open(log_dir / "webserver.log", "ab")  # noqa: SIM115 - closed by stop()
    daemon_log = open(log_dir / "daemon.log", "ab")  # noqa: SIM115
    webserver = subprocess.Popen(
        [
            dagster_bin("dagster-webserver"),
            "-w",
            str(WORKSPACE_YAML),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=full_env,
        stdout=web_log,
        stderr=subprocess.STDOUT,
        cwd=PROJECT_ROOT,
    )
    daemon = _start_daemon(full_env, daemon_log)
    processes = DagsterProcesses(
        webserver, daemon, f"http://127.0.0.1:{port}", [web_log, daemon_log], full_env
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if webserver.poll() is not None or daemon.poll() is not None:
            processes.stop()
            raise RuntimeError(f"Dagster exited early; see the logs in {log_dir}")
        try:
            with urllib.request.urlopen(processes.url + "/server_info", timeout=2) as response:
                if response.status == 200:
                    return processes
        except OSError:
            time.sleep(0.5)
    processes.stop()
    raise RuntimeError(f"dagster-webserver did not answer within 180s; see {log_dir}")


# Statuses a batch stays in until something new happens to it.
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
    instance: Any  # DagsterInstance
    url: str
    processes: DagsterProcesses | None = None  # to stop and start the daemon (fault tests)

    @property
    def landing(self) -> str:
        return self.env["PUBLISH_PLATFORM_LANDING"]


@contextmanager
def running_platform(
    folder: Path,
    s3_endpoint: str,
    metastore: str | None = None,
    dagster_postgres_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningPlatform]:
    """The platform on this machine, its home in ``folder``: landing and state buckets of its
    own on ``s3_endpoint``, dagster-webserver and dagster-daemon (Dagster on SQLite, or on
    Postgres with ``dagster_postgres_url``), the local catalog unless ``metastore`` says other.
    This process's environment is the platform's while it runs."""
    from dagster import DagsterInstance

    suffix = uuid.uuid4().hex[:8]
    home = folder / "home"
    dagster_home = home / "dagster"
    env = {
        **LOCAL_CREDENTIALS,
        "AWS_ENDPOINT_URL": s3_endpoint,
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
    s3 = s3_client(s3_endpoint)
    ensure_bucket(s3, f"land-{suffix}")
    ensure_bucket(s3, f"state-{suffix}")

    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    processes = start_dagster(env, free_port(), folder / "logs")
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        yield RunningPlatform(env, instance, processes.url, processes)
    finally:
        instance.dispose()
        processes.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_state(
    instance: Any,
    landing: str,
    key: str,
    statuses: set[PublishStatus] = SETTLED,
    timeout: float = 240,
    dead_letters: Any = None,
    poll_s: float = 1.0,
) -> PublishState:
    """Poll a batch's publish-state until it is in ``statuses``; the state it reached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if key in instance.get_dynamic_partitions("workflow_runs"):
            dead = dead_letters() if dead_letters else None
            state = derive_states(instance, landing, [key], dead_letters=dead)[0]
            if state.status in statuses:
                return state
        time.sleep(poll_s)
    raise TimeoutError(f"{key} did not reach {sorted(statuses)} within {timeout}s")
