"""Shared fixtures: a real S3 API (moto server over HTTP), per-test buckets and settings, and a
real PostgreSQL started from the machine's binaries.

Nothing here is mocked in-process: the S3 endpoint is a separate moto server process reached by
boto3 over HTTP, exactly as every platform process reaches it, and Postgres is a real server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from publish_platform import local_s3
from publish_platform.config import Settings

# --- S3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process on 127.0.0.1; boto3 reaches it via AWS_ENDPOINT_URL."""
    port = local_s3.free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log, pytest.MonkeyPatch.context() as patch:
        process = local_s3.start_moto_server(port, log=log)
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        for name, value in local_s3.LOCAL_CREDENTIALS.items():
            patch.setenv(name, value)
        try:
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    return local_s3.s3_client(moto_endpoint)


@pytest.fixture
def settings(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str
) -> Settings:
    """Settings with fresh landing and state buckets of their own, and a SQLite catalog."""
    suffix = uuid.uuid4().hex[:8]
    landing_bucket, state_bucket = f"land-{suffix}", f"state-{suffix}"
    s3.create_bucket(Bucket=landing_bucket)
    s3.create_bucket(Bucket=state_bucket)
    values = {
        "landing": f"s3://{landing_bucket}/",
        "state": f"s3://{state_bucket}/",
        "metastore": f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        "settle_seconds": "0",
        "home": str(tmp_path),
    }
    for name, value in values.items():
        monkeypatch.setenv(f"PUBLISH_PLATFORM_{name.upper()}", value)
    return Settings(
        landing=values["landing"],
        state=values["state"],
        metastore=values["metastore"],
        settle_seconds=0,
        home=tmp_path,
    )


@pytest.fixture
def state(s3: Any, settings: Settings) -> Any:
    """The state store in the test's own state bucket."""
    from publish_platform.state import StateStore

    return StateStore(s3, settings.state_location)


@pytest.fixture
def catalog(settings: Settings) -> Iterator[Any]:
    """The local catalog of the test's settings (a SQLite file in the test's folder)."""
    from publish_platform.metastores.sql import SqlCatalog

    catalog = SqlCatalog(settings.metastore_url)
    yield catalog
    catalog.close()


# --- PostgreSQL ------------------------------------------------------------------------------


def _postgres_binaries() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        initdb, pg_ctl = os.path.join(folder, "initdb"), os.path.join(folder, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def _postgres_system_user() -> pwd.struct_passwd:
    """Postgres refuses to run as root: as root, its processes run as the ``postgres`` user."""
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "postgres"], check=True)
        return pwd.getpwnam("postgres")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL of its own (127.0.0.1, free port, trust auth) with database ``catalog``."""
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or /usr/lib/postgresql")
    initdb, pg_ctl = binaries

    # Not under pytest's tmp dir: that one is 0700 root-owned, unreachable for the postgres user.
    base = Path(tempfile.mkdtemp(prefix="pp-pg-"))
    data, sockets, log = base / "data", base / "run", base / "postgres.log"
    sockets.mkdir()
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        user = _postgres_system_user()
        for path in (base, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def run(*args: str) -> None:
        completed = subprocess.run(
            args, cwd=base, env=env, capture_output=True, text=True, timeout=120, **run_as
        )
        if completed.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({completed.returncode}):\n{completed.stdout}\n"
                f"{completed.stderr}\n{server_log}"
            )

    port = local_s3.free_port()
    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = (
        f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c synchronous_commit=off"
        " -c full_page_writes=off"
    )
    run(pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        _create_database(admin, "catalog")
        yield f"postgresql://postgres@127.0.0.1:{port}/catalog"
    finally:
        with contextlib.suppress(Exception):
            run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _create_database(admin_url: str, name: str, replace: bool = False) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            if replace:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()


@pytest.fixture
def make_postgres_database(postgres_url: str) -> Callable[..., str]:
    """``make_postgres_database(name=None) -> url`` of a new, empty database on the test server.

    Without a name a unique one is chosen; an existing database of that name is replaced.
    """
    admin = postgres_url.rsplit("/", 1)[0] + "/postgres"

    def make(name: str | None = None) -> str:
        name = name or f"db_{uuid.uuid4().hex[:12]}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be alphanumeric/underscore: {name!r}")
        _create_database(admin, name, replace=True)
        return postgres_url.rsplit("/", 1)[0] + "/" + name

    return make
