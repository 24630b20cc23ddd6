"""Shared fixtures: a real S3 API (moto server over HTTP), per-test buckets and settings, and a
real PostgreSQL started from the machine's binaries.

Nothing here is mocked in-process: the S3 endpoint is a separate moto server process reached by
boto3 over HTTP, exactly as every platform process reaches it, and Postgres is a real server.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# Every retry tier runs for real in the tests, with its delays scaled down (tests that measure a
# delay set their own scale). Set before the definitions are imported: the retry policy reads it.
os.environ.setdefault("PUBLISH_PLATFORM_RETRY_DELAY_SCALE", "0.01")

from publish_platform import local_s3
from publish_platform.config import Settings
from publish_platform.interrupts import handle_interrupts
from publish_platform_tests.postgres import LocalPostgres, started_postgres


def pytest_configure(config: pytest.Config) -> None:
    """The tests stop what they start with SIGTERM, also when the suite runs in the background."""
    handle_interrupts()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow end-to-end tests first: the workers start on the longest tests and the short ones
    fill the gaps, so the suite does not end waiting on one long test started last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """The tests' shared PostgreSQL server (127.0.0.1, free port, trust auth)."""
    yield from started_postgres()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: LocalPostgres) -> str:
    """URL of database ``catalog`` on the shared server."""
    return postgres_server.create_database("catalog", replace=True)


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL server for one test alone, started; the test may stop and restart it."""
    yield from started_postgres()


@pytest.fixture
def make_postgres_database(postgres_server: LocalPostgres) -> Callable[..., str]:
    """``make_postgres_database(name=None) -> url`` of a new, empty database on the test server.

    Without a name a unique one is chosen; an existing database of that name is replaced.
    """

    def make(name: str | None = None) -> str:
        return postgres_server.create_database(name or f"db_{uuid.uuid4().hex[:12]}", replace=True)

    return make


# --- Atlan -----------------------------------------------------------------------------------

ATLAN_TEST_KEY = "atlan-test-key-" + uuid.uuid4().hex  # planted: must never appear anywhere


@pytest.fixture
def atlas(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A local Atlas-compatible server on 127.0.0.1 requiring an API key; pyatlan's variables
    point at it."""
    from publish_platform.local_atlas import LocalAtlas

    with LocalAtlas(api_key=ATLAN_TEST_KEY) as server:
        monkeypatch.setenv("ATLAN_BASE_URL", server.url)
        monkeypatch.setenv("ATLAN_API_KEY", ATLAN_TEST_KEY)
        yield server


@pytest.fixture
def atlan_settings(settings: Settings, atlas: Any, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's settings with Atlan (the local server) as the metastore."""
    monkeypatch.setenv("PUBLISH_PLATFORM_METASTORE", "atlan")
    return settings.model_copy(update={"metastore": "atlan"})


# --- Alerts ----------------------------------------------------------------------------------


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers["Content-Length"])
        _Webhook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A webhook receiver on 127.0.0.1: ``(url, alerts received as JSON)``."""
    _Webhook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", local_s3.free_port()), _Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", _Webhook.received
    finally:
        server.shutdown()


# --- S3 faults -------------------------------------------------------------------------------


@pytest.fixture
def s3_faults(moto_endpoint: str) -> Iterator[Any]:
    """A fault-injecting proxy in front of the moto server (see ``s3_faults.FaultProxy``)."""
    from publish_platform_tests.s3_faults import fault_proxy

    with fault_proxy(moto_endpoint) as proxy:
        yield proxy
