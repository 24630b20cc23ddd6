"""Security: planted secrets appear nowhere; the scope guard; state-store paths stay in their
source's prefix.

The secrets test runs the real ``publish_batch`` job in-process on a Dagster instance whose
storage is PostgreSQL (as in production), with every secret the platform is given planted with a
known value: the Atlan API key, the passwords of the catalog, of Dagster's storage and of the
shared Atlan budget's database, the AWS keys (used against moto), and the alert webhook's token.
Two batches publish, and two fail on purpose where an error message could echo a URL or a key:
a catalog database that does not exist, and an Atlan tenant that refuses the key. Both failures
are dead-lettered (and alerted to a webhook that is down). Then everything is scanned: every file
under the Dagster home and the platform home (event log, compute logs, databases), every row of
the three databases, every object of both buckets, the event log as the UI reads it
(materialization metadata included), ``status --json``, ``status-page --now --out``, and
everything the process printed.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import polars as pl
import pytest
import sqlalchemy as sa
from dagster import (
    DagsterEventType,
    DagsterInstance,
    build_run_status_sensor_context,
    serialize_value,
)

from publish_platform import cli
from publish_platform.config import Settings
from publish_platform.defs import defs
from publish_platform.landing import RunRef
from publish_platform.local_s3 import free_port
from publish_platform.pipeline import PlanHeldError, read_plan, run_diff, run_plan, run_publish
from publish_platform.plan import PLAN_SCHEMA, check_scope
from publish_platform.publish_state import PublishStatus, derive_states
from publish_platform.runtime import write_instance_yaml
from publish_platform.state import StateStore, source_segment

from .conftest import ATLAN_TEST_KEY
from .support import (
    SOURCE,
    bucket_objects,
    catalog_identities,
    entity,
    files_under,
    identities,
    land_batch,
    planted_secrets_in,
    run_batch,
    small_source,
)


def _secret(name: str) -> str:
    return f"planted-{name}-{uuid.uuid4().hex}"


def _with_password(url: str, password: str) -> str:
    return sa.make_url(url).set(password=password).render_as_string(hide_password=False)


def _database_text(url: str) -> str:
    """Every row of every table of a database, as text."""
    engine = sa.create_engine(url)
    try:
        tables = sa.MetaData()
        tables.reflect(engine)
        with engine.connect() as connection:
            return "\n".join(
                repr(row)
                for table in tables.sorted_tables
                for row in connection.execute(sa.select(table))
            )
    finally:
        engine.dispose()


def _event_log_text(instance: DagsterInstance) -> str:
    """Every run and every event of it (messages, metadata, errors), serialized."""
    parts = []
    for record in instance.get_run_records():
        parts.append(serialize_value(record.dagster_run))
        parts.extend(
            serialize_value(entry) for entry in instance.all_logs(record.dagster_run.run_id)
        )
    return "\n".join(parts)


def _dead_letter(instance: DagsterInstance, run_id: str) -> None:
    """One evaluation of the dead-letter sensor on a failed run, as the daemon does it."""
    (failure,) = instance.get_records_for_run(run_id, of_type=DagsterEventType.RUN_FAILURE).records
    context = build_run_status_sensor_context(
        sensor_name="dead_letter_sensor",
        dagster_event=failure.event_log_entry.dagster_event,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(run_id),
        resources=defs.resources,
    ).for_run_failure()
    defs.get_sensor_def("dead_letter_sensor")(context)


@pytest.mark.usefixtures("atlas")
def test_planted_secrets_appear_nowhere(
    s3: Any,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_postgres_database: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)  # everything the platform logs, and more than it shows
    # The scan finds a secret as is and as a URL carries it.
    assert planted_secrets_in({"s": "a b/c"}, {"x": b"..a b/c..", "y": b"a%20b%2Fc"}) == [
        "s in x",
        "s in y",
    ]
    secrets = {
        "ATLAN_API_KEY": ATLAN_TEST_KEY,  # the key the local Atlan accepts
        "ATLAN_API_KEY (refused)": _secret("atlan-key"),
        "catalog password": _secret("catalog-password"),
        "DAGSTER_POSTGRES_URL password": _secret("dagster-password"),
        "rate limit database password": _secret("budget-password"),
        "AWS_ACCESS_KEY_ID": "AKIA" + uuid.uuid4().hex[:16].upper(),
        "AWS_SECRET_ACCESS_KEY": _secret("aws-secret"),
        "alert webhook token": _secret("webhook-token"),
    }
    catalog_url = _with_password(make_postgres_database(), secrets["catalog password"])
    missing_catalog = (
        sa.make_url(catalog_url)
        .set(database="no_such_catalog")
        .render_as_string(hide_password=False)
    )
    dagster_url = _with_password(make_postgres_database(), secrets["DAGSTER_POSTGRES_URL password"])
    budget_url = _with_password(make_postgres_database(), secrets["rate limit database password"])
    dagster_home = tmp_path / "dagster"
    write_instance_yaml(dagster_home, storage="postgres")
    for name, value in {
        "DAGSTER_HOME": str(dagster_home),
        "DAGSTER_POSTGRES_URL": dagster_url,
        "PUBLISH_PLATFORM_RATE_LIMIT_URL": budget_url,
        "PUBLISH_PLATFORM_ALERT_WEBHOOK": (
            f"http://127.0.0.1:{free_port()}/hooks/{secrets['alert webhook token']}"
        ),
        "PUBLISH_PLATFORM_SCHEDULED_RELAUNCHES": "0",  # a failure is final: dead-lettered
        "AWS_ACCESS_KEY_ID": secrets["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secrets["AWS_SECRET_ACCESS_KEY"],
    }.items():
        monkeypatch.setenv(name, value)

    batches = {  # name: (metastore, Atlan key, expected status)
        "sql": (catalog_url, ATLAN_TEST_KEY, PublishStatus.COMPLETE),
        "sql-refused": (missing_catalog, ATLAN_TEST_KEY, PublishStatus.FAILED),
        "atlan": ("atlan", ATLAN_TEST_KEY, PublishStatus.COMPLETE),
        "atlan-refused": ("atlan", secrets["ATLAN_API_KEY (refused)"], PublishStatus.FAILED),
    }
    job = defs.resolve_job_def("publish_batch")
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        for number, (name, (metastore, atlan_key, expected)) in enumerate(batches.items(), 1):
            source = f"default/secrets/{number}"
            run = RunRef("secrets", "wf", name)
            land_batch(s3, settings, run, small_source(source), source=source)
            monkeypatch.setenv("PUBLISH_PLATFORM_METASTORE", metastore)
            monkeypatch.setenv("ATLAN_API_KEY", atlan_key)
            instance.add_dynamic_partitions("workflow_runs", [run.partition_key])
            result = job.execute_in_process(
                partition_key=run.partition_key, instance=instance, raise_on_error=False
            )
            (batch,) = derive_states(instance, settings.landing, [run.partition_key])
            assert batch.status == expected, (name, batch.failure_details)
            if expected == PublishStatus.FAILED:
                _dead_letter(instance, result.run_id)
        monkeypatch.setenv("PUBLISH_PLATFORM_METASTORE", catalog_url)

        printed = [capfd.readouterr()]
        assert cli.main(["status", "--json"]) == 0
        printed.append(capfd.readouterr())
        status = json.loads(printed[-1].out)
        out = tmp_path / "status-page"
        assert cli.main(["status-page", "--now", "--out", str(out)]) == 0
        event_log = _event_log_text(instance)
        instance_info = instance.info_str()  # the UI's instance configuration page
    finally:
        instance.dispose()
    printed.append(capfd.readouterr())

    # The scan sees what it should: the failures' reasons, dead letters, logs, pages.
    reasons = {b["partition_key"]: b for b in status["batches"]}
    refused = reasons["secrets/wf/atlan-refused"]["failure_details"]["message"]
    assert "the API key (ATLAN_API_KEY) was refused" in refused
    assert 'database \\"no_such_catalog\\" does not exist' in event_log  # JSON-escaped
    state_objects = bucket_objects(s3, settings.state_location.bucket)
    assert sum(key.startswith("dead_letters/") for key in state_objects) == 2
    assert (out / "index.html").exists() and list(dagster_home.rglob("*.err"))
    dagster_db = _database_text(dagster_url)
    assert "default/secrets/1" in dagster_db  # materialization metadata lives here

    places = {
        **files_under(tmp_path),
        **{f"state object {k}": v for k, v in state_objects.items()},
        **{
            f"landing object {k}": v
            for k, v in bucket_objects(s3, settings.landing_location.bucket).items()
        },
        "Dagster storage (Postgres)": dagster_db.encode(),
        "catalog database": _database_text(catalog_url).encode(),
        "rate limit database": _database_text(budget_url).encode(),
        "event log": event_log.encode(),
        "instance info": instance_info.encode(),
        "printed output (status --json, status-page, logs)": "".join(
            captured.out + captured.err for captured in printed
        ).encode(),
        "Python log records": caplog.text.encode(),
    }
    assert planted_secrets_in(secrets, places) == []


# --- scope guard -----------------------------------------------------------------------------

OTHER = "default/test/10"  # shares "default/test/1" as a string prefix, not as a namespace


def _operations(entities: list[dict]) -> pl.DataFrame:
    """The operations of a plan creating ``entities``, as build_plan makes them."""
    rows = [
        {
            **dict.fromkeys(PLAN_SCHEMA),
            "seq": seq,
            "op": "create",
            "type_name": e["typeName"],
            "qualified_name": e["attributes"]["qualifiedName"],
            "entity": json.dumps(e),
        }
        for seq, e in enumerate(entities)
    ]
    return pl.DataFrame(rows, schema=PLAN_SCHEMA)


def test_scope_check_refuses_entities_outside_the_source_namespace() -> None:
    inside = entity("Table", "db/s/t1")
    other_connection = entity("Table", "db/s/t1", OTHER)
    # Claims this connection, but its qualifiedName lies in another's namespace.
    outside_namespace = entity("Table", "db/s/t2", connectionQualifiedName=SOURCE)
    outside_namespace["attributes"]["qualifiedName"] = f"{OTHER}/db/s/t2"
    # "default/test/10": starts with the source's name, but is not in its namespace.
    prefix_trap = entity("Database", "", SOURCE, qualifiedName=f"{SOURCE}0")

    assert check_scope(SOURCE, _operations([inside])).passed
    refused = check_scope(
        SOURCE, _operations([inside, other_connection, outside_namespace, prefix_trap])
    )
    assert not refused.passed and refused.blocking
    assert refused.description == f"3 operation(s) touch entities outside {SOURCE}"
    assert refused.metadata["out_of_scope"] == 3
    assert {tuple(e) for e in refused.metadata["examples"]} == {
        ("Table", f"{OTHER}/db/s/t1"),
        ("Table", f"{OTHER}/db/s/t2"),
        ("Database", f"{SOURCE}0"),
    }


def test_scope_check_reads_the_attribute_however_the_json_spells_it() -> None:
    """The check passes a canonical JSON that states the source once without parsing it; any
    other spelling is parsed, so neither a nested copy of the key nor an escaped key fools it."""

    def operations(texts: list[str]) -> pl.DataFrame:
        return _operations([entity("Table", f"db/s/t{n}") for n in range(len(texts))]).with_columns(
            entity=pl.Series(texts, dtype=pl.String)
        )

    def canonical(connection: str, **attributes: Any) -> str:
        made = entity("Table", "db/s/t", connectionQualifiedName=connection, **attributes)
        return orjson.dumps(made, option=orjson.OPT_SORT_KEYS).decode()

    within = [
        canonical(SOURCE),
        # The key quoted in a value is escaped there: not the key.
        canonical(SOURCE, description=f'copied from "connectionQualifiedName":"{OTHER}"'),
        # A nested copy of the key: parsed, and the entity's own attribute is the source.
        canonical(SOURCE, extra={"connectionQualifiedName": OTHER}),
        json.dumps(entity("Table", "db/s/t")),  # not canonical: parsed
    ]
    assert check_scope(SOURCE, operations(within)).passed

    escaped = canonical(OTHER, extra={"connectionQualifiedName": SOURCE}).replace(
        f'"connectionQualifiedName":"{OTHER}"', f'"connection\\u0051ualifiedName":"{OTHER}"'
    )
    assert escaped.count('"connectionQualifiedName"') == 1  # the nested one, the source
    outside = [
        canonical(OTHER),
        canonical(OTHER, extra={"connectionQualifiedName": SOURCE}),
        escaped,
        json.dumps(entity("Table", "db/s/t", connectionQualifiedName=OTHER)),
    ]
    refused = check_scope(SOURCE, operations(within + outside))
    assert refused.metadata["out_of_scope"] == len(outside)
    assert [name for _, name in refused.metadata["examples"]] == [
        f"{SOURCE}/db/s/t{n}" for n in range(len(within), len(within) + len(outside))
    ]


def test_a_plan_reaching_into_another_source_is_never_published(s3, state, settings, catalog):
    """Even a stored plan tampered with after its checks passed: the publish step re-checks
    scope on what it is about to apply, and writes nothing."""
    first, second = RunRef("test", "wf", "run-1"), RunRef("test", "wf", "run-2")
    land_batch(s3, settings, first, small_source(OTHER), source=OTHER)
    run_batch(s3, state, settings, catalog, first)
    land_batch(s3, settings, second, small_source(), source_timestamp="2026-01-02T00:00:00Z")
    run_diff(s3, state, settings, second.partition_key)
    _, plan, checks = run_plan(state, settings, second.partition_key, catalog)
    assert all(c.passed for c in checks)
    # Tampered: one operation now rewrites the other source's table.
    hijack = entity("Table", "db/s/t1", OTHER, description="hijacked")
    tampered = read_plan(state, second.partition_key).operations.with_columns(
        pl.when(pl.col("qualified_name") == f"{SOURCE}/db/s/t1")
        .then(pl.lit(json.dumps(hijack)))
        .otherwise(pl.col("entity"))
        .alias("entity"),
        pl.when(pl.col("qualified_name") == f"{SOURCE}/db/s/t1")
        .then(pl.lit(f"{OTHER}/db/s/t1"))
        .otherwise(pl.col("qualified_name"))
        .alias("qualified_name"),
    )
    state.put_frame(state.batch_key(second.partition_key, "plan.parquet"), tampered)
    assert read_plan(state, second.partition_key).operations.equals(tampered)
    versions = catalog.versions()

    with pytest.raises(PlanHeldError, match=f"1 operation\\(s\\) touch entities outside {SOURCE}"):
        run_publish(state, settings, catalog, second.partition_key)

    assert catalog.versions() == versions and catalog_identities(catalog, SOURCE) == set()
    assert catalog_identities(catalog, OTHER) == identities(small_source(OTHER))
    assert state.current_pointer(SOURCE) is None and state.current_serial(OTHER) == 1


# --- state-store paths -----------------------------------------------------------------------

HOSTILE_SOURCES = [
    "..",
    ".",
    "../other",
    "default/../../batches/x",
    "/etc/passwd",
    "default/test/1/../2",
    "a\\..\\b",
    "%2E%2E",
    "%2F",
    "sources/x/pointer.json",
    "x/",
    "...",
    "café/😀",
    "a b?c#d",
]


def test_state_store_paths_cannot_escape_their_source_prefix(state: StateStore) -> None:
    root = state.location.key("sources/")
    segments = {}
    for source in HOSTILE_SOURCES:
        for key in (
            state.source_key(source, "pointer.json"),
            state.snapshot_key(source, 7, "plan"),
            state.history_key(source, 7),
        ):
            # Inside its own segment, and nothing in it that resolves elsewhere.
            assert key.startswith(root) and posixpath.normpath(key) == key, (source, key)
            segment = key[len(root) :].split("/", 1)[0]
            assert segment == source_segment(source) and segment not in (".", "..")
        segments[source] = segment
        assert unquote(segment) == source  # what list_sources gives back
    assert len(set(segments.values())) == len(HOSTILE_SOURCES)  # no two sources share one
    with pytest.raises(ValueError, match="empty connection qualified name"):
        state.source_key("", "pointer.json")


def test_a_hostile_connection_name_publishes_inside_its_own_prefix(s3, state, settings, catalog):
    """A connection named to climb out of its prefix: every object written for it is under
    ``sources/<its segment>/`` or the batch's own folder, and it reads back by its name."""
    source = "../../batches/x"
    run = RunRef("test", "wf", "hostile")
    land_batch(s3, settings, run, small_source(source), source=source)
    *_, result = run_batch(s3, state, settings, catalog, run)
    assert result.outcome == "published" and result.serial == 1

    allowed = (
        state.location.key("sources", source_segment(source)) + "/",
        state.location.key("batches", run.partition_key) + "/",
    )
    written = bucket_objects(s3, settings.state_location.bucket)
    assert written and all(key.startswith(allowed) for key in written), sorted(written)
    assert state.list_sources() == [source]
    assert state.read_snapshot(source, 1).height == len(small_source(source))
