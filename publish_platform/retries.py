"""The retry tiers, one mechanism each, all scaled by ``PUBLISH_PLATFORM_RETRY_DELAY_SCALE``.

1. immediate — inside the step: a chunk that hit a transient metastore error is retried a few
   times within seconds (``with_immediate_retries``).
2. delayed — Dagster's op retry policy on ``publish``: exponential backoff with jitter; a
   throttling answer waits at least its Retry-After (``delayed_wait``).
3. scheduled — Dagster run retries (dagster.yaml) for crashed runs, and a schedule that
   re-launches failed partitions, one run each. After that, the dead-letter queue.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from publish_platform.metastores.base import ThrottledError, TransientMetastoreError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryTiers:
    scale: float = 1.0
    immediate_attempts: int = 3  # retries after the first try, inside the step
    immediate_delay_s: float = 0.5  # doubled at each attempt
    delayed_retries: int = 3  # op retries (tier 2)
    delayed_delay_s: float = 10.0  # doubled at each retry, ± jitter
    scheduled_relaunches: int = 2  # tier 3 re-launches of a failed partition
    relaunch_window_hours: float = 24.0  # failures older than this are left to the DLQ
    relaunch_cron: str = "*/10 * * * *"  # when the relaunch schedule looks for failed batches

    @property
    def immediate_base(self) -> float:
        return self.immediate_delay_s * self.scale

    @property
    def delayed_base(self) -> float:
        return self.delayed_delay_s * self.scale


def retry_tiers() -> RetryTiers:
    def number(name: str, default: float) -> float:
        return float(os.environ.get(f"PUBLISH_PLATFORM_{name}", default))

    return RetryTiers(
        scale=number("RETRY_DELAY_SCALE", 1.0),
        immediate_attempts=int(number("IMMEDIATE_RETRIES", 3)),
        delayed_retries=int(number("DELAYED_RETRIES", 3)),
        scheduled_relaunches=int(number("SCHEDULED_RELAUNCHES", 2)),
        relaunch_window_hours=number("RELAUNCH_WINDOW_HOURS", 24.0),
        relaunch_cron=os.environ.get("PUBLISH_PLATFORM_RELAUNCH_CRON", "*/10 * * * *"),
    )


def with_immediate_retries(
    call: Callable[[], T],
    tiers: RetryTiers,
    on_retry: Callable[[int, Exception], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Tier 1: retry a transient failure a few times, quickly. Throttling is not retried here:
    the metastore waits out short cool-downs itself (tenant-wide, see metastores.rate_limit) and
    raises ThrottledError only for what should go up to tier 2."""
    attempt = 0
    while True:
        try:
            return call()
        except ThrottledError:
            raise
        except TransientMetastoreError as exc:
            if attempt >= tiers.immediate_attempts:
                raise
            if on_retry is not None:
                on_retry(attempt + 1, exc)
            sleep(tiers.immediate_base * (2**attempt))
            attempt += 1


def delayed_wait(retry_number: int, tiers: RetryTiers, retry_after: float | None = None) -> float:
    """Tier 2's wait before retry ``retry_number`` (0-based): exponential with ±50% jitter,
    and never shorter than the metastore's Retry-After."""
    backoff = tiers.delayed_base * (2**retry_number) * random.uniform(0.5, 1.5)  # noqa: S311
    return max(backoff, retry_after or 0.0)
