"""One request budget per Atlan tenant, shared by every run and process that publishes to it.

Atlan limits requests per tenant and blocks a tenant for a while after a 429. Runs publish
concurrently (one per source), each in its own process, so the budget has to live outside them:
a small SQL table (SQLite file by default, Postgres when several hosts publish) holds the times of
the requests sent in the current window and the tenant's cool-down. A request waits until
it fits the budget (a sliding window: never more than ``budget`` requests in any ``window_s``)
and until any cool-down is over; a 429 starts a cool-down that pauses every worker. A request
holds its place in the window 5% longer than the window: the time between admission and arrival
at Atlan must not let two windows' worth of requests arrive inside one.

Times are wall-clock seconds of the machines taking part: hosts sharing one budget need
synchronised clocks (NTP), as any distributed limiter does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

ARRIVAL_MARGIN = 0.05

metadata = sa.MetaData()

sent_requests = sa.Table(
    "rate_limit_requests",
    metadata,
    sa.Column("tenant", sa.String(255), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_rate_limit_requests_tenant_at", "tenant", "at"),
)

tenants = sa.Table(
    "rate_limit_tenants",
    metadata,
    sa.Column("tenant", sa.String(255), primary_key=True),
    sa.Column("blocked_until", sa.Float, nullable=False, default=0.0),
)


def _engine(url: str) -> sa.Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # SQLite serialises writers only from their first write; BEGIN IMMEDIATE takes the write
    # lock at the start, so reading the window and recording a request are one atomic step.
    engine = sa.create_engine(url, connect_args={"timeout": 60, "isolation_level": None})

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class TenantRateLimiter:
    def __init__(
        self,
        url: str,
        tenant: str,
        budget: int,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if budget < 1 or window_s <= 0:
            raise ValueError("a rate limit needs a budget of at least 1 request and a window > 0")
        self.tenant, self.budget, self.window_s = tenant, budget, window_s
        self.held_s = window_s * (1 + ARRIVAL_MARGIN)
        self.clock, self.sleep = clock, sleep
        self.engine = _engine(url)
        metadata.create_all(self.engine, checkfirst=True)
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        with self.engine.begin() as connection:
            connection.execute(
                insert(tenants)
                .values(tenant=tenant, blocked_until=0.0)
                .on_conflict_do_nothing(index_elements=["tenant"])
            )

    def acquire(self) -> float:
        """Wait until one more request fits the budget and no cool-down is on; record it.
        Returns the seconds waited."""
        waited = 0.0
        while True:
            wait = self._try_acquire()
            if wait <= 0:
                return waited
            self.sleep(wait)
            waited += wait

    def cool_down(self, seconds: float) -> None:
        """Pause every worker of this tenant for ``seconds`` (never shortens a longer pause)."""
        until = self.clock() + seconds
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(tenants)
                .where((tenants.c.tenant == self.tenant) & (tenants.c.blocked_until < until))
                .values(blocked_until=until)
            )

    def blocked_for(self) -> float:
        """Seconds of cool-down left."""
        with self.engine.connect() as connection:
            until = connection.scalar(
                sa.select(tenants.c.blocked_until).where(tenants.c.tenant == self.tenant)
            )
        return max(0.0, (until or 0.0) - self.clock())

    def _try_acquire(self) -> float:
        """Record a request and return 0, or return how long to wait before trying again."""
        with self.engine.begin() as connection:
            # Serialises the tenant's workers (SQLite: BEGIN IMMEDIATE already did).
            lock = sa.select(tenants.c.blocked_until).where(tenants.c.tenant == self.tenant)
            if self.engine.dialect.name == "postgresql":
                lock = lock.with_for_update()
            blocked_until = connection.scalar(lock) or 0.0
            now = self.clock()
            if blocked_until > now:
                return blocked_until - now
            window_start = now - self.held_s
            mine = sent_requests.c.tenant == self.tenant
            connection.execute(
                sa.delete(sent_requests).where(mine & (sent_requests.c.at <= window_start))
            )
            count, oldest = connection.execute(
                sa.select(sa.func.count(), sa.func.min(sent_requests.c.at)).where(mine)
            ).one()
            if count >= self.budget:
                return oldest + self.held_s - now
            connection.execute(sa.insert(sent_requests).values(tenant=self.tenant, at=now))
            return 0.0

    def close(self) -> None:
        self.engine.dispose()
