"""Platform settings, read from the environment (``PUBLISH_PLATFORM_*``).

Every process of the platform (CLI, Dagster code server, run workers) builds its settings here, so
the embedded default and production differ only by environment variables. Secrets never live in
these settings: S3 credentials come from boto3's own variables, Atlan's from pyatlan's.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from publish_platform.observability import AlertThresholds

DEFAULT_VOLATILE_ATTRIBUTES = ("lastSyncRun", "lastSyncRunAt", "lastSyncWorkflowName")
# Entities per transaction of the SQL catalog unless PUBLISH_PLATFORM_CHUNK_SIZE says other.
SQL_CHUNK_SIZE = 2000


class S3Location(BaseModel, frozen=True):
    """A bucket and a key prefix (always empty or ending with ``/``)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://bucket/prefix, got {url!r}")
        prefix = parts.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if ".." in prefix.split("/"):
            raise ValueError(f"prefix may not contain '..': {url!r}")
        return cls(bucket=parts.netloc, prefix=prefix)

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class Settings(BaseSettings):
    """What an operator configures. Defaults are the embedded (local) mode."""

    model_config = SettingsConfigDict(env_prefix="PUBLISH_PLATFORM_", extra="ignore")

    home: Path = Field(
        default=Path(".publish_platform"),
        description="Local folder of the embedded mode: SQLite catalog, Dagster home, logs.",
    )
    landing: str = Field(
        default="s3://publish-landing/",
        description="s3://bucket/prefix where connector workflow runs land.",
    )
    state: str = Field(
        default="s3://publish-state/",
        description="s3://bucket/prefix for snapshots, pointers, plans and dead letters.",
    )
    metastore: str = Field(
        default="",
        description="sqlite:///path (default: <home>/catalog.sqlite), postgresql://… or atlan.",
    )
    settle_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Quiet period after which a run folder without a manifest is ready.",
    )
    volatile_attributes: Annotated[tuple[str, ...], NoDecode] = Field(
        default=DEFAULT_VOLATILE_ATTRIBUTES,
        description="Attributes that never make an entity changed (comma separated).",
    )
    deletion_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Largest share of a source's entities one batch may delete without approval.",
    )
    deletion_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description='Per-source overrides of deletion_threshold, JSON: {"<connection>": 0.8}.',
    )
    source_importance: dict[str, int] = Field(
        default_factory=dict,
        description='Per-source importance (-50..50) for run priority, JSON: {"<connection>": 20}.',
    )
    chunk_size: int = Field(
        default=0,
        ge=0,
        description="Entities per metastore request; 0 takes the metastore's default (Atlan: 50,"
        " within the 20-50 Atlan advises; SQL catalog: 2,000).",
    )
    sensor_interval_seconds: int = Field(default=15, ge=1)
    landing_queue_url: str | None = Field(
        default=None,
        description="SQS queue that receives the landing bucket's ObjectCreated notifications:"
        " the sensor then lists only run folders named in new events (cost grows with what is"
        " new, not with the history), plus a full listing every landing_full_scan_minutes.",
    )
    landing_full_scan_minutes: float = Field(
        default=60.0,
        gt=0,
        description="With a landing queue: how often the sensor still lists every run folder,"
        " in case a notification was lost.",
    )
    purge_deletes: bool = Field(default=False, description="Purge instead of archive on delete.")
    # Atlan (PUBLISH_PLATFORM_METASTORE=atlan). Where and who: pyatlan's own ATLAN_BASE_URL and
    # ATLAN_API_KEY, read by pyatlan from the environment and never by this platform.
    atlan_request_budget: int = Field(
        default=600,
        ge=1,
        description="Requests to one Atlan tenant per budget window, across every run and host.",
    )
    atlan_budget_window_seconds: float = Field(default=60.0, gt=0)
    atlan_cooldown_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Pause of every worker after a 429 that names no Retry-After (Atlan blocks"
        " a tenant for 60 s after a 429).",
    )
    atlan_throttle_retries: int = Field(
        default=5,
        ge=0,
        description="429s one request waits out inside the step before the step goes to tier 2.",
    )
    atlan_max_inline_wait_seconds: float = Field(
        default=120.0,
        ge=0,
        description="Longest cool-down waited inside a step; a longer one releases the worker"
        " and retries the step later (tier 2, never before Retry-After).",
    )
    # Monitoring and alerts.
    sla_minutes: float = Field(
        default=60.0, gt=0, description="Landing → published, per batch: what the page promises."
    )
    monitor_window_hours: float = Field(
        default=1.0, gt=0, description="Window of throughput, error rate and latency metrics."
    )
    monitor_cron: str = Field(
        default="*/5 * * * *", description="When queue metrics and the status page are refreshed."
    )
    alert_queue_depth: int = Field(default=100, ge=1, description="Batches in flight to alert at.")
    alert_queue_age_minutes: float = Field(
        default=30.0, gt=0, description="Age of the oldest batch in flight to alert at."
    )
    rate_limit_url: str = Field(
        default="",
        description="Database holding the shared Atlan request budget (default: SQLite file in"
        " home; use Postgres when runs publish from several hosts).",
    )

    @field_validator("volatile_attributes", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("deletion_thresholds")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {source: share for source, share in value.items() if not 0 <= share <= 1}
        if bad:
            raise ValueError(f"deletion thresholds must be shares between 0 and 1: {bad}")
        return value

    @field_validator("landing", "state")
    @classmethod
    def _valid_s3_url(cls, value: str) -> str:
        S3Location.parse(value)
        return value

    def deletion_threshold_for(self, source: str) -> float:
        return self.deletion_thresholds.get(source, self.deletion_threshold)

    @cached_property
    def landing_location(self) -> S3Location:
        return S3Location.parse(self.landing)

    @cached_property
    def state_location(self) -> S3Location:
        return S3Location.parse(self.state)

    @property
    def metastore_url(self) -> str:
        if self.metastore:
            return self.metastore
        return f"sqlite:///{(self.home / 'catalog.sqlite').resolve()}"

    @property
    def monitor_window(self) -> timedelta:
        return timedelta(hours=self.monitor_window_hours)

    @property
    def alert_thresholds(self) -> AlertThresholds:
        from publish_platform.observability import AlertThresholds

        return AlertThresholds(
            queue_depth=self.alert_queue_depth,
            queue_age_minutes=self.alert_queue_age_minutes,
            sla_minutes=self.sla_minutes,
        )

    @property
    def publish_chunk_size(self) -> int:
        if self.chunk_size:
            return self.chunk_size
        # The SQL catalog: one transaction (and one checkpoint) per chunk; at 500 the per-chunk
        # commit and statement overhead was a fifth of a first publish.
        return 50 if self.metastore_kind == "atlan" else SQL_CHUNK_SIZE

    @property
    def rate_limit_database(self) -> str:
        return self.rate_limit_url or f"sqlite:///{(self.home / 'rate_limit.sqlite').resolve()}"

    @property
    def metastore_display(self) -> str:
        """The metastore URL with any password masked: safe for logs and the UI."""
        if self.metastore_kind == "atlan":
            return f"atlan ({os.environ.get('ATLAN_BASE_URL', 'ATLAN_BASE_URL not set')})"
        from sqlalchemy.engine import make_url

        return make_url(self.metastore_url).render_as_string(hide_password=True)

    @property
    def metastore_kind(self) -> Literal["sql", "atlan"]:
        return "atlan" if self.metastore_url == "atlan" else "sql"


def load_settings() -> Settings:
    return Settings()
