"""Retry tiers 1 and 2 with the real machinery: a Postgres catalog that goes away and comes back."""

from __future__ import annotations

import threading
import time

import pytest

from publish_platform.landing import RunRef
from publish_platform.metastores.base import ThrottledError, TransientMetastoreError
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.pipeline import run_diff, run_plan, run_publish
from publish_platform.retries import RetryTiers, delayed_wait, retry_tiers, with_immediate_retries
from publish_platform_tests.support import catalog_identities, identities, land_batch, small_source

RUN = RunRef("test", "wf", "run-retries")


def test_tier_1_retries_transient_errors_only() -> None:
    calls: list[str] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append("call")
        if len(calls) < 3:
            raise TransientMetastoreError("connection reset")
        return "ok"

    tiers = RetryTiers(immediate_attempts=3, immediate_delay_s=0.5, scale=2)
    assert with_immediate_retries(flaky, tiers, sleep=slept.append) == "ok"
    assert len(calls) == 3 and slept == [1.0, 2.0]  # doubled, scaled

    def throttled() -> None:
        raise ThrottledError("429", retry_after=7)

    with pytest.raises(ThrottledError):  # up to tier 2, which honours Retry-After
        with_immediate_retries(throttled, tiers, sleep=slept.append)

    def broken() -> None:
        raise ValueError("bad entity")

    with pytest.raises(ValueError):  # not transient: isolated by splitting, never retried
        with_immediate_retries(broken, tiers, sleep=slept.append)
    assert slept == [1.0, 2.0]

    with pytest.raises(TransientMetastoreError):  # still down after the attempts: tier 2
        with_immediate_retries(
            lambda: (_ for _ in ()).throw(TransientMetastoreError("x")), tiers, sleep=slept.append
        )


def test_tier_2_waits_at_least_retry_after_and_backs_off(monkeypatch) -> None:
    monkeypatch.setenv("PUBLISH_PLATFORM_RETRY_DELAY_SCALE", "0.1")
    tiers = retry_tiers()
    assert tiers.delayed_base == pytest.approx(1.0)
    for attempt in range(4):
        assert delayed_wait(attempt, tiers, retry_after=30) >= 30
        wait = delayed_wait(attempt, tiers)
        assert 0.5 * 2**attempt <= wait <= 1.5 * 2**attempt


def test_a_catalog_restart_mid_publish_is_absorbed_by_tier_1(
    s3, state, settings, own_postgres, monkeypatch
) -> None:
    monkeypatch.setenv("PUBLISH_PLATFORM_RETRY_DELAY_SCALE", "1")
    monkeypatch.setenv("PUBLISH_PLATFORM_IMMEDIATE_RETRIES", "6")  # 0.5+1+2+4+8+16 s at most
    catalog = SqlCatalog(own_postgres.create_database("catalog"))
    try:
        entities = small_source()
        land_batch(s3, settings, RUN, entities)
        run_diff(s3, state, settings, RUN.partition_key)
        run_plan(state, settings, RUN.partition_key, catalog)

        own_postgres.stop()  # the metastore goes away…
        restart = threading.Timer(2.0, own_postgres.start)  # …and comes back two seconds later
        restart.start()
        retries: list[str] = []
        started = time.monotonic()
        result = run_publish(
            state,
            settings,
            catalog,
            RUN.partition_key,
            on_retry=lambda attempt, exc: retries.append(f"{attempt}: {exc}"),
        )
        restart.join()
        assert result.outcome == "published" and result.failed == 0
        assert result.immediate_retries == len(retries) >= 1
        assert "OperationalError" in retries[0]
        assert time.monotonic() - started >= 2.0
        assert catalog_identities(catalog) == identities(entities)
    finally:
        catalog.close()


def test_a_catalog_that_stays_down_goes_up_to_tier_2(
    s3, state, settings, own_postgres, monkeypatch
) -> None:
    monkeypatch.setenv("PUBLISH_PLATFORM_RETRY_DELAY_SCALE", "0.01")
    catalog = SqlCatalog(own_postgres.create_database("catalog"))
    try:
        land_batch(s3, settings, RUN, small_source())
        run_diff(s3, state, settings, RUN.partition_key)
        run_plan(state, settings, RUN.partition_key, catalog)
        own_postgres.stop()
        retries: list[int] = []
        with pytest.raises(TransientMetastoreError):
            run_publish(
                state,
                settings,
                catalog,
                RUN.partition_key,
                on_retry=lambda attempt, exc: retries.append(attempt),
            )
        assert retries == [1, 2, 3]
        assert state.current_serial(small_source()[0]["attributes"]["connectionQualifiedName"]) == 0
    finally:
        catalog.close()
