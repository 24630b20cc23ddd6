"""The dead-letter queue: batches that exhausted every retry tier, kept in the state store.

One object per batch, ``dead_letters/<app>/<workflow_id>/<run_id>.json``, holding the batch
reference, the failure reason and diagnostics, and the full retry history (tier, time and error
of every attempt). Operators list, inspect, requeue or drop entries; a dropped entry stays, with
who dropped it and why, so nothing leaves the queue unrecorded.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from publish_platform.landing import RunRef
from publish_platform.state import StateStore

Tier = Literal["initial", "immediate", "delayed", "run_retry", "scheduled", "manual"]


class Attempt(BaseModel):
    """One try at publishing a batch, and how it ended."""

    tier: Tier
    at: datetime
    dagster_run_id: str | None = None
    step: str | None = None
    error: str


class DeadLetter(BaseModel):
    partition_key: str
    source: str | None = None
    s3_path: str
    reason: str
    error_type: str | None = None
    diagnostics: dict[str, object] = Field(default_factory=dict)
    history: list[Attempt] = Field(default_factory=list)
    dead_lettered_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    last_run_id: str | None = None
    state: Literal["dead", "requeued", "dropped"] = "dead"
    requeued_at: datetime | None = None
    requeue_run_id: str | None = None
    dropped_at: datetime | None = None
    dropped_by: str | None = None
    drop_reason: str | None = None


class DeadLetterQueue:
    def __init__(self, state: StateStore) -> None:
        self.state = state

    def key(self, partition_key: str) -> str:
        run = RunRef.from_partition_key(partition_key)
        return self.state.location.key("dead_letters", f"{run.partition_key}.json")

    def put(self, entry: DeadLetter) -> None:
        self.state.put_bytes(
            self.key(entry.partition_key), entry.model_dump_json(indent=2).encode()
        )

    def get(self, partition_key: str) -> DeadLetter | None:
        found = self.state.get_bytes(self.key(partition_key))
        return DeadLetter.model_validate_json(found[0]) if found else None

    def list(self, include_closed: bool = False) -> list[DeadLetter]:
        prefix = self.state.location.key("dead_letters/")
        entries = []
        paginator = self.state.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.state.location.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found = self.state.get_bytes(item["Key"])
                if found is not None:
                    entry = DeadLetter.model_validate_json(found[0])
                    if include_closed or entry.state == "dead":
                        entries.append(entry)
        return sorted(entries, key=lambda e: e.dead_lettered_at)

    def mark_requeued(self, partition_key: str, run_id: str) -> DeadLetter:
        entry = self._require(partition_key)
        entry.state = "requeued"
        entry.requeued_at = datetime.now(UTC)
        entry.requeue_run_id = run_id
        self.put(entry)
        return entry

    def drop(self, partition_key: str, by: str, reason: str) -> DeadLetter:
        entry = self._require(partition_key)
        entry.state = "dropped"
        entry.dropped_at = datetime.now(UTC)
        entry.dropped_by = by
        entry.drop_reason = reason
        self.put(entry)
        return entry

    def _require(self, partition_key: str) -> DeadLetter:
        entry = self.get(partition_key)
        if entry is None:
            raise KeyError(f"{partition_key} is not in the dead-letter queue")
        return entry
