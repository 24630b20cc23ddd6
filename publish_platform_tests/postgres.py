"""A real PostgreSQL server for the tests, from the machine's initdb/pg_ctl, on 127.0.0.1.

Postgres refuses to run as root, so as root its processes run as the ``postgres`` system user
(created if missing). A test may stop and start its own server to make the catalog go away and
come back.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from publish_platform import local_s3


def postgres_binaries() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        initdb, pg_ctl = os.path.join(folder, "initdb"), os.path.join(folder, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def _postgres_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "postgres"], check=True)
        return pwd.getpwnam("postgres")


class LocalPostgres:
    def __init__(self, binaries: tuple[str, str]) -> None:
        self.initdb, self.pg_ctl = binaries
        # Not under pytest's tmp dir: that one is 0700 root-owned, unreachable for postgres.
        self.base = Path(tempfile.mkdtemp(prefix="pp-pg-"))
        self.data, self.sockets = self.base / "data", self.base / "run"
        self.log = self.base / "postgres.log"
        self.sockets.mkdir()
        self.run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = _postgres_system_user()
            for path in (self.base, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.port = local_s3.free_port()
        self._run(
            self.initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def _run(self, *args: str) -> None:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        completed = subprocess.run(
            args,
            cwd=self.base,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **self.run_as,
        )
        if completed.returncode != 0:
            server_log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({completed.returncode}):\n{completed.stdout}\n"
                f"{completed.stderr}\n{server_log}"
            )

    def start(self) -> None:
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            self.pg_ctl,
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, replace: bool = False) -> str:
        import sqlalchemy as sa

        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be alphanumeric/underscore: {name!r}")
        engine = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                if replace:
                    connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def started_postgres() -> Iterator[LocalPostgres]:
    """A started server for a fixture to yield from, destroyed afterwards; skips the test when
    the machine has no PostgreSQL binaries."""
    import pytest

    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or /usr/lib/postgresql")
    server = LocalPostgres(binaries)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
