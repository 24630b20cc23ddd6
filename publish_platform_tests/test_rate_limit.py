"""The tenant's request budget holds across processes, on SQLite and on Postgres; a cool-down
started by one worker pauses all of them."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from publish_platform.metastores.rate_limit import TenantRateLimiter

BUDGET, WINDOW = 10, 1.0
WORKERS, REQUESTS_EACH = 4, 8


def _worker(url: str, out: multiprocessing.Queue) -> None:
    readings: list[float] = []

    def clock() -> float:
        readings.append(time.time())
        return readings[-1]

    limiter = TenantRateLimiter(url, "tenant-a", BUDGET, WINDOW, clock=clock)
    times = []
    for _ in range(REQUESTS_EACH):
        limiter.acquire()
        times.append(
            readings[-1]
        )  # when the limiter admitted it (a loaded CI box may return later)
    limiter.close()
    out.put(times)


def _most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.fixture(params=["sqlite", "postgres"])
def limiter_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rate_limit.sqlite'}"
    return request.getfixturevalue("make_postgres_database")()


def test_the_budget_holds_across_concurrent_processes(limiter_url: str) -> None:
    TenantRateLimiter(limiter_url, "tenant-a", BUDGET, WINDOW).close()  # schema in place first
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [context.Process(target=_worker, args=(limiter_url, out)) for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    times = [at for _ in workers for at in out.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=10)

    assert len(times) == WORKERS * REQUESTS_EACH  # every request went out, none lost
    assert _most_in_any_window(times, WINDOW) <= BUDGET
    # 32 requests at 10 per second cannot take less than 2 full windows.
    assert max(times) - min(times) >= 2 * WINDOW


def test_a_cool_down_pauses_every_worker_and_other_tenants_are_not_affected(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'rate_limit.sqlite'}"
    throttled = TenantRateLimiter(url, "tenant-a", 100, 60)
    other_worker = TenantRateLimiter(url, "tenant-a", 100, 60)
    other_tenant = TenantRateLimiter(url, "tenant-b", 100, 60)
    try:
        throttled.cool_down(1.0)
        throttled.cool_down(0.1)  # a shorter pause never cuts a longer one short
        started = time.monotonic()
        other_tenant.acquire()
        assert time.monotonic() - started < 0.5
        waited = other_worker.acquire()
        assert waited >= 0.8 and time.monotonic() - started >= 0.9
        assert other_worker.blocked_for() == 0
    finally:
        for limiter in (throttled, other_worker, other_tenant):
            limiter.close()


def test_a_limiter_needs_a_budget(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="budget"):
        TenantRateLimiter(f"sqlite:///{tmp_path / 'r.sqlite'}", "t", 0)
