"""The bad input catalogue: every kind of bad input the platform knows, in one table, each with the
outcome it must have, run through the real Dagster job (moto server S3, SQLite catalog).

Each row lands a bad run folder on top of a published source and checks three things:
- the outcome: an isolated line or entity (the batch still publishes the rest), a quarantined,
  held or skipped batch, or a run folder the landing sensor rejects;
- that the reason and a clear message are in the materialization metadata (for a held batch, in
  the blocking check's evaluation) and in the run's event log;
- the published state: untouched (pointer, snapshots, catalog) when the batch is not publishable;
  when entities are isolated, the rest published and nothing else changed.

Many of these cases are tested in depth elsewhere (test_entities, test_landing, test_diff_plan,
test_deletion_safety); this table is the one place that shows them all with their outcomes. The
README's "Bad input, faults and security" table mirrors it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
import pytest
from dagster import DagsterInstance, ExecuteInProcessResult, instance_for_test

from publish_platform.config import Settings
from publish_platform.defs import defs
from publish_platform.landing import RunRef
from publish_platform.publish_state import PublishStatus, derive_states

from .support import (
    SOURCE,
    catalog_identities,
    entity,
    identities,
    jsonl,
    land,
    land_batch,
    manifest_for,
    ref,
    run_batch,
    sensor_tick,
    sha256,
    small_source,
)

OTHER = "default/other/2"
DATA = "transformed/entities/entities.json"
BASELINE = RunRef("test", "wf", "baseline")
PUBLISHED_AT = "2026-01-01T00:00:00Z"
LANDED_AT = "2026-01-02T00:00:00Z"
NEW_COLUMN = entity("Column", "db/s/t1/c3")
# The bad batch's good part: the published source plus one new column (a create), in parents-
# first order with the new column before t2, so that a file cut after it loses only t2.
GOOD = [*small_source()[:5], NEW_COLUMN, *small_source()[5:]]
BAD_LINE = len(GOOD) + 1  # a bad line is appended after the good ones


class Outcome(StrEnum):
    ISOLATED = "isolated"  # the line or entity is left out and reported; the rest publishes
    QUARANTINED = "quarantined"  # nothing of the batch is published
    HELD = "held"  # a blocking check holds the batch for an operator
    SKIPPED = "skipped"  # the workflow run did not succeed: recorded, not published
    REJECTED = "rejected"  # the landing sensor never makes the folder a batch


STATUS = {
    Outcome.ISOLATED: PublishStatus.COMPLETE,
    Outcome.QUARANTINED: PublishStatus.QUARANTINED,
    Outcome.HELD: PublishStatus.HELD,
    Outcome.SKIPPED: PublishStatus.SKIPPED,
}

Folder = tuple[dict[str, bytes], dict | bytes | None]


def manifest(run: RunRef, **overrides: Any) -> dict:
    return manifest_for(run, SOURCE, source_timestamp=LANDED_AT, **overrides)


def with_line(line: bytes, entities: list[dict] = GOOD) -> Callable[[RunRef], Folder]:
    """The good batch plus one bad line at its end, with a manifest."""
    return lambda run: ({DATA: jsonl(entities) + line + b"\n"}, manifest(run))


def with_entities(*extra: dict) -> Callable[[RunRef], Folder]:
    return lambda run: ({DATA: jsonl([*GOOD, *extra])}, manifest(run))


def truncated(run: RunRef) -> Folder:
    """An upload cut in the middle of an object: t2 and its columns are lost with it."""
    cut = orjson.dumps(GOOD[6])[:60]
    return {DATA: jsonl(GOOD[:6]) + cut}, manifest(run)


def sidecar_mismatch(run: RunRef) -> Folder:
    data = jsonl(GOOD)
    return {DATA: data, DATA + ".sha256": sha256(data + b"tampered").encode()}, manifest(run)


def counts_disagree(run: RunRef) -> Folder:
    data = jsonl(GOOD)
    return {DATA: data}, manifest(run, files=[{"path": DATA, "records": len(GOOD) + 1}])


def manifest_paths(*paths: str) -> Callable[[RunRef], Folder]:
    """The manifest lists files by an absolute path or one that climbs out of the run folder."""

    def folder(run: RunRef) -> Folder:
        listed = [{"path": DATA, "records": len(GOOD)}]
        listed += [{"path": path, "records": 1} for path in paths]
        return {DATA: jsonl(GOOD)}, manifest(run, files=listed)

    return folder


def deeply_nested(levels: int) -> bytes:
    """An entity whose customAttributes nest ``levels`` deep (written as text: no serializer
    would produce it)."""
    line = orjson.dumps(entity("Table", "db/s/deep")).decode()
    nested = '{"a":' * levels + '"leaf"' + "}" * levels
    return line.replace('"customAttributes":{}', f'"customAttributes":{{"x":{nested}}}').encode()


def without(attribute: str) -> bytes:
    bad = entity("Table", "db/s/t9")
    if attribute == "typeName":
        del bad["typeName"]
    else:
        del bad["attributes"][attribute]
    return orjson.dumps(bad)


def conflicting_duplicate(run: RunRef) -> Folder:
    """t2 (already published) twice, with two different descriptions."""
    first, second = (entity("Table", "db/s/t2", description=d) for d in ("one", "two"))
    return {DATA: jsonl([*GOOD, first, second])}, manifest(run)


def several_connections(run: RunRef) -> Folder:
    return {DATA: jsonl([*GOOD, *small_source(OTHER)])}, None


@dataclass(frozen=True)
class Case:
    name: str
    folder: Callable[[RunRef], Folder]
    outcome: Outcome
    reason: str  # the reason's name, as reported
    message: str  # part of the message that explains it
    line: int | None = None  # the bad line, for what is isolated line by line


CASES = [
    Case(
        "malformed-json-line",
        with_line(b'{"typeName": "Table", "attributes": {"qualifiedName": '),
        Outcome.ISOLATED,
        "malformed_json",
        "not valid JSON",
        BAD_LINE,
    ),
    Case(
        "truncated-file",
        truncated,
        Outcome.ISOLATED,
        "malformed_json",
        "no deletion is inferred from this batch",
        7,
    ),
    Case(
        "non-utf8-bytes",
        with_line(orjson.dumps(entity("Table", "db/s/t9")).replace(b'"t9"', b'"t\xff9"', 1)),
        Outcome.ISOLATED,
        "malformed_json",
        "not valid UTF-8",
        BAD_LINE,
    ),
    Case(
        "line-over-10mb",
        with_line(orjson.dumps(entity("Table", "db/s/big", description="x" * (10 * 2**20)))),
        Outcome.ISOLATED,
        "line_too_large",
        "exceeds 10485760",
        BAD_LINE,
    ),
    Case(
        "nested-10000-levels",
        with_line(deeply_nested(10_000)),
        Outcome.ISOLATED,
        "too_deeply_nested",
        "JSON nested deeper than 254 levels",
        BAD_LINE,
    ),
    Case(
        "nested-300-levels",
        with_line(deeply_nested(300)),
        Outcome.ISOLATED,
        "too_deeply_nested",
        "JSON nested deeper than 254 levels",
        BAD_LINE,
    ),
    Case(
        "missing-qualified-name",
        with_line(without("qualifiedName")),
        Outcome.ISOLATED,
        "missing_qualified_name",
        "entity has no attributes.qualifiedName",
        BAD_LINE,
    ),
    Case(
        "missing-type-name",
        with_line(without("typeName")),
        Outcome.ISOLATED,
        "missing_type_name",
        "entity has no typeName",
        BAD_LINE,
    ),
    Case(
        "unknown-type-name",
        with_entities({**entity("Table", "db/s/w"), "typeName": "Widget"}),
        Outcome.ISOLATED,
        "unknown_type",
        "typeName Widget is not a type this platform publishes",
        BAD_LINE,
    ),
    Case(
        "same-identity-different-content",
        conflicting_duplicate,
        Outcome.ISOLATED,
        "conflicting_duplicate",
        "identity appears more than once with different content",
        BAD_LINE,
    ),
    Case(
        "entity-of-another-connection",
        with_entities(entity("Table", "db/s/t1", OTHER)),
        Outcome.ISOLATED,
        "wrong_source",
        f"belongs to connection {OTHER}, not to this batch's {SOURCE}",
        BAD_LINE,
    ),
    Case(
        "qualified-name-outside-the-connection",
        with_entities(entity("Table", "db/s/t8", qualifiedName=f"{OTHER}/db/s/t8")),
        Outcome.ISOLATED,
        "wrong_source",
        f"lies outside the namespace of connection {SOURCE}",
        BAD_LINE,
    ),
    Case(
        "dangling-reference",
        with_entities(entity("Column", "db/s/t1/c4", table=ref("Table", f"{SOURCE}/db/s/gone"))),
        Outcome.ISOLATED,
        "dangling_reference",
        f"{SOURCE}/db/s/gone",
    ),
    Case(
        "sha256-mismatch",
        sidecar_mismatch,
        Outcome.QUARANTINED,
        "checksum_mismatch",
        f"{DATA}: sha256",
    ),
    Case(
        "invalid-manifest",
        lambda run: ({DATA: jsonl(GOOD)}, {**manifest(run), "mode": "sometimes", "run_id": None}),
        Outcome.QUARANTINED,
        "rejected_manifest",
        "invalid publish-request.json: run_id",
    ),
    Case(
        "manifest-counts-disagree",
        counts_disagree,
        Outcome.QUARANTINED,
        "count_mismatch",
        f"{DATA}: {len(GOOD)} records but manifest says {len(GOOD) + 1}",
    ),
    Case(
        "manifest-path-absolute-or-with-dotdot",
        manifest_paths("/etc/passwd", "transformed/../../other-run/entities.json"),
        Outcome.QUARANTINED,
        "rejected_manifest",
        "files.1.path: Value error, must be a relative path inside the run folder (absolute",
    ),
    Case(
        "object-key-with-dotdot-or-empty-segment",
        lambda run: (
            {
                DATA: jsonl(GOOD),
                "transformed/../x.json": jsonl([entity("Table", "db/s/x")]),
                "transformed//y.json": jsonl([entity("Table", "db/s/y")]),
            },
            manifest(run),
        ),
        Outcome.QUARANTINED,
        "unsafe_key",
        "object key 'transformed/../x.json': path segment '..'",
    ),
    Case(
        "no-transformed-data",
        lambda run: ({"raw/table/chunk-0.json": b'{"table_name": "t"}\n'}, manifest(run)),
        Outcome.QUARANTINED,
        "no_data",
        "run folder has no transformed/**/*.json data",
    ),
    Case(
        "empty-batch-without-manifest",
        lambda run: ({DATA: b""}, None),
        Outcome.QUARANTINED,
        "no_data",
        "no valid entity to derive a source from",
    ),
    Case(
        "several-connections-without-manifest",
        several_connections,
        Outcome.QUARANTINED,
        "rejected_manifest",
        f"the data names several connections: {OTHER}, {SOURCE}",
    ),
    Case(
        "empty-batch",
        lambda run: ({DATA: b""}, manifest(run)),
        Outcome.HELD,
        "deletion_safety",
        f"empty full batch would delete all 8 entities of {SOURCE}",
    ),
    Case(
        "manifest-status-failed",
        lambda run: ({}, manifest(run, status="FAILED")),
        Outcome.SKIPPED,
        "skipped",
        "workflow run status is FAILED",
    ),
    Case(
        "run-folder-named-dotdot",
        lambda run: ({DATA: jsonl(GOOD)}, manifest(run)),
        Outcome.REJECTED,
        "unsafe path segment",
        "'..'",
    ),
]


@pytest.fixture(scope="module")
def instance() -> Iterator[DagsterInstance]:
    """One Dagster instance for the whole table: every case has a partition of its own."""
    with instance_for_test() as instance:
        yield instance


def published_state(s3: Any, settings: Settings, state: Any, catalog: Any) -> tuple:
    """Everything a batch may change once published: pointer, source objects, catalog."""
    prefix = settings.state_location.key("sources/")
    listed = s3.list_objects_v2(Bucket=settings.state_location.bucket, Prefix=prefix)
    objects = sorted((o["Key"], o["ETag"]) for o in listed.get("Contents", []))
    return state.read_pointer(SOURCE), objects, catalog.versions()


def reported_metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
    """The run's materialization metadata (by asset) and check evaluations."""
    reported: dict[str, Any] = {}
    for node in ("diff", "plan", "publish"):
        for materialization in result.asset_materializations_for_node(node):
            reported[node] = {k: v.value for k, v in materialization.metadata.items()}
    reported["checks"] = [
        {
            "check": e.check_name,
            "passed": e.passed,
            "description": e.description,
            "metadata": {k: v.value for k, v in e.metadata.items()},
        }
        for e in result.get_asset_check_evaluations()
    ]
    return reported


def logged(instance: DagsterInstance, run_id: str) -> str:
    """Every message of the run in the Dagster event log."""
    return "\n".join(entry.user_message for entry in instance.all_logs(run_id))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input(
    case: Case,
    s3: Any,
    state: Any,
    settings: Settings,
    catalog: Any,
    instance: DagsterInstance,
    capsys: pytest.CaptureFixture[str],
) -> None:
    land_batch(s3, settings, BASELINE, small_source(), source_timestamp=PUBLISHED_AT)
    run_batch(s3, state, settings, catalog, BASELINE)
    before = published_state(s3, settings, state, catalog)

    if case.outcome is Outcome.REJECTED:
        run = RunRef("test", "wf", "..")  # built directly: from_partition_key would refuse it
        land(s3, settings.landing_location, run, *case.folder(run))
        tick = sensor_tick(instance)
        # Only the baseline's folder (never a partition of this instance) is picked up.
        assert [r.partition_key for r in tick.run_requests] == [BASELINE.partition_key]
        (rejected,) = json.loads(tick.cursor)["rejected"]
        assert case.reason in rejected and case.message in rejected
        # The tick's log (the daemon keeps it with the tick; here it goes to the console).
        assert f"run folder ignored: {rejected}" in capsys.readouterr().err
        assert published_state(s3, settings, state, catalog) == before
        return

    run = RunRef("test", "wf", f"bad-{case.name}")
    land(s3, settings.landing_location, run, *case.folder(run))
    key = run.partition_key
    instance.add_dynamic_partitions("workflow_runs", [key])

    result = defs.resolve_job_def("publish_batch").execute_in_process(
        partition_key=key, instance=instance, raise_on_error=False
    )

    (batch,) = derive_states(instance, settings.landing, [key])
    assert batch.status == STATUS[case.outcome], batch.failure_details
    reported = reported_metadata(result)
    metadata, logs = json.dumps(reported, default=str), logged(instance, result.run_id)
    for text in (metadata, logs):
        assert case.reason in text and case.message in text
    if case.line is not None:  # where it is: file and line
        assert {"source_file": DATA, "line": case.line, "reason": case.reason}.items() <= next(
            issue for issue in reported["diff"]["issues"] if issue["line"] == case.line
        ).items()
        assert f"isolated {DATA}:{case.line} ({case.reason})" in logs
    if case.outcome is Outcome.ISOLATED:
        assert result.success
        assert batch.metrics.isolated >= 1 and batch.snapshot_serial == 2
        # The rest is published: the new column created, nothing else rewritten or deleted.
        assert catalog_identities(catalog) == identities(GOOD)
        assert set(catalog.versions().values()) == {1}
        assert not list(catalog.dump(OTHER))
        snapshot = state.read_snapshot(SOURCE, 2, payload=False)
        assert set(snapshot.select("type_name", "qualified_name").iter_rows()) == identities(GOOD)
    else:
        # Not publishable: not one write anywhere, and the status says why.
        assert published_state(s3, settings, state, catalog) == before
        assert case.message in batch.failure_details.message
