"""Processes of a running platform: the Dagster instance home, webserver and daemon.

Used by ``publish-platform dev`` and by the end-to-end tests, so both run the platform the same
way production does: ``dagster-webserver`` and ``dagster-daemon`` on ``workspace.yaml``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

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


@dataclass
class DagsterProcesses:
    webserver: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    url: str
    logs: list[IO[bytes]] = field(default_factory=list)

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
    daemon = subprocess.Popen(
        [dagster_bin("dagster-daemon"), "run", "-w", str(WORKSPACE_YAML)],
        env=full_env,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        cwd=PROJECT_ROOT,
    )
    processes = DagsterProcesses(
        webserver, daemon, f"http://127.0.0.1:{port}", [web_log, daemon_log]
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
