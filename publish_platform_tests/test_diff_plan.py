"""Diff and plan: changes against a snapshot, isolation, ordering and the plan checks."""

from __future__ import annotations

import copy
import uuid

import orjson
import polars as pl
import pytest

from publish_platform import entities as entities_module
from publish_platform.diff import DIFF_SCHEMA, TYPE_RANK, DiffResult, diff_batch
from publish_platform.entities import ParsedEntities, parse_files
from publish_platform.plan import (
    build_plan,
    check_deletion_safety,
    check_references,
    check_required_attributes,
    check_scope,
    plan_id,
    preview,
)
from publish_platform.publish import RESULT_SCHEMA, next_snapshot
from publish_platform.state import empty_snapshot

from .support import (
    SOURCE,
    UPSTREAM_SOURCE,
    VOLATILE,
    entity,
    jsonl,
    resync,
    small_source,
    upstream_data,
    upstream_entities,
)

PK = "app/wf/run-1"


def parse(entities: list[dict], extra: bytes = b"") -> ParsedEntities:
    return parse_files([("transformed/x/entities.json", jsonl(entities) + extra)], VOLATILE)


def published(parsed: ParsedEntities, source: str) -> pl.DataFrame:
    """The snapshot a fully successful first publish of ``parsed`` leaves behind."""
    plan = build_plan(diff_batch(parsed, empty_snapshot(), source, "full"), PK, 0)
    ops = plan.operations
    results = pl.DataFrame(
        {
            "seq": ops["seq"],
            "ok": [True] * ops.height,
            "guid": [f"guid-{i}" for i in range(ops.height)],
            "error": [None] * ops.height,
        },
        schema=RESULT_SCHEMA,
    )
    return next_snapshot(empty_snapshot(), ops, results).collect()


def ops_of(diff: DiffResult, op: str) -> set[tuple[str, str]]:
    changes = diff.changes.lazy().filter(pl.col("op") == op)  # held, or (a first batch) scanned
    rows = changes.select("type_name", "qualified_name").collect().rows()
    return set(rows)


def qn(path: str) -> str:
    return f"{UPSTREAM_SOURCE}/shopdb/{path}"


@pytest.fixture
def fixture_snapshot() -> pl.DataFrame:
    return published(parse_files(sorted(upstream_data().items()), VOLATILE), UPSTREAM_SOURCE)


def modified_fixture() -> list[dict]:
    """The fixture as a later sync sees it: one column dropped, one added, one table changed."""
    entities = []
    for original in upstream_entities():
        e = copy.deepcopy(original)
        e["attributes"]["lastSyncRun"] = "22222222-2222-4222-8222-222222222222"
        e["attributes"]["lastSyncRunAt"] += 86_400_000
        attrs = e["attributes"]
        if attrs["qualifiedName"] == qn("hr/employees/dept"):
            continue
        if attrs["qualifiedName"] == qn("sales/orders"):
            attrs["description"] = "All orders"
        entities.append(e)
    new_column = copy.deepcopy(
        next(e for e in entities if e["attributes"]["qualifiedName"] == qn("hr/employees/salary"))
    )
    new_column["attributes"].update(qualifiedName=qn("hr/employees/bonus"), name="bonus", order=5)
    entities.append(new_column)
    return entities


# --- diff ------------------------------------------------------------------------------------


def test_first_batch_is_all_creates(fixture_snapshot):
    parsed = parse_files(sorted(upstream_data().items()), VOLATILE)
    diff = diff_batch(parsed, empty_snapshot(), UPSTREAM_SOURCE, "full")
    assert (diff.count("create"), diff.count("update"), diff.count("delete")) == (38, 0, 0)
    assert fixture_snapshot.height == 38
    assert fixture_snapshot["guid"].null_count() == 0


def test_diff_fixture_against_modified_copy(fixture_snapshot):
    diff = diff_batch(parse(modified_fixture()), fixture_snapshot, UPSTREAM_SOURCE, "full")

    assert ops_of(diff, "create") == {("Column", qn("hr/employees/bonus"))}
    assert ops_of(diff, "update") == {("Table", qn("sales/orders"))}
    assert ops_of(diff, "delete") == {("Column", qn("hr/employees/dept"))}
    assert diff.count("unchanged") == 36  # volatile attributes changed on all of them
    assert diff.issues == [] and diff.deletions_withheld is None
    assert diff.snapshot_entities == 38 and diff.valid_entities == 38

    rows = {(r["op"], r["qualified_name"]): r for r in diff.changes.iter_rows(named=True)}
    guid_of = dict(zip(fixture_snapshot["qualified_name"], fixture_snapshot["guid"], strict=True))
    update = rows[("update", qn("sales/orders"))]
    assert update["guid"] == guid_of[qn("sales/orders")]
    assert orjson.loads(update["entity"])["attributes"]["description"] == "All orders"
    assert rows[("delete", qn("hr/employees/dept"))]["guid"] == guid_of[qn("hr/employees/dept")]
    assert rows[("create", qn("hr/employees/bonus"))]["guid"] is None
    assert "unchanged" not in diff.changes["op"].to_list()  # counted, not listed


def test_only_volatile_changes_is_an_empty_diff(fixture_snapshot):
    data = {k: resync(v, "run-3", 1, "other-workflow") for k, v in upstream_data().items()}
    diff = diff_batch(
        parse_files(sorted(data.items()), VOLATILE), fixture_snapshot, UPSTREAM_SOURCE, "full"
    )
    assert diff.count("unchanged") == 38
    assert diff.changes.filter(pl.col("op") != "unchanged").height == 0


def test_force_resends_unchanged_entities_as_updates(fixture_snapshot):
    parsed = parse_files(sorted(upstream_data().items()), VOLATILE)
    diff = diff_batch(parsed, fixture_snapshot, UPSTREAM_SOURCE, "full", force=True)
    assert diff.count("update") == 38
    assert diff.changes["entity"].null_count() == 0


def test_incremental_batch_never_deletes(fixture_snapshot):
    batch = [e for e in modified_fixture() if e["typeName"] != "Column"]  # 13 of 38
    diff = diff_batch(parse(batch), fixture_snapshot, UPSTREAM_SOURCE, "incremental")
    assert diff.count("delete") == 0
    assert ops_of(diff, "update") == {("Table", qn("sales/orders"))}
    plan = build_plan(diff, PK, 1)
    assert plan.header.deletes == 0
    assert check_deletion_safety(plan.header, 0.0).passed
    # The same batch as a full snapshot would delete every column.
    full = diff_batch(parse(batch), fixture_snapshot, UPSTREAM_SOURCE, "full")
    assert full.count("delete") == 25


def test_line_without_identity_in_full_batch_withholds_every_deletion(fixture_snapshot):
    diff = diff_batch(
        parse(modified_fixture(), extra=b'{"typeName": "Column", "attributes": {"qualifiedN\n'),
        fixture_snapshot,
        UPSTREAM_SOURCE,
        "full",
    )
    assert diff.count("delete") == 0
    assert diff.deletions_withheld and "1 line(s) without an identity" in diff.deletions_withheld
    # Creates and updates still go through.
    assert diff.count("create") == 1 and diff.count("update") == 1
    assert diff.issue_counts() == {"malformed_json": 1}


def test_isolated_entities_with_an_identity_are_not_deleted(fixture_snapshot):
    entities = upstream_entities()
    email = next(
        e for e in entities if e["attributes"]["qualifiedName"] == qn("sales/customers/email")
    )
    twin = copy.deepcopy(email)
    twin["attributes"]["dataType"] = "text"
    without_connection = next(
        e for e in entities if e["attributes"]["qualifiedName"] == qn("sales/customers/id")
    )
    del without_connection["attributes"]["connectionQualifiedName"]

    diff = diff_batch(parse([*entities, twin]), fixture_snapshot, UPSTREAM_SOURCE, "full")

    assert diff.issue_counts() == {"missing_connection": 1, "conflicting_duplicate": 2}
    assert diff.count("delete") == 0  # present in the batch, only not publishable
    assert diff.deletions_withheld is None
    assert diff.count("unchanged") == 36


@pytest.mark.parametrize("spilled", [False, True], ids=["held", "spilled"])
def test_screening_isolates_wrong_source_unknown_type_and_conflicts(spilled, tmp_path, monkeypatch):
    """Spilled, the rows' content hashes are in the spill: those of the repeated identities are
    read back to tell a conflict from an exact duplicate. A spilled first batch's rows are not
    held: the diff reads only the rows it may isolate, and lists the others as creates from their
    files, so the same are isolated and created whether the rows are held or not."""
    other = "default/test/10"  # shares a string prefix with SOURCE: the namespace check must hold
    base = small_source()
    t1 = next(e for e in base if e["attributes"]["qualifiedName"].endswith("/t1"))
    conflicting = copy.deepcopy(t1)
    conflicting["attributes"]["description"] = "differs"
    exact_duplicate = copy.deepcopy(base[-1])
    exact_duplicate["attributes"]["lastSyncRun"] = "only-volatile-differs"
    batch = [
        *base,
        conflicting,
        exact_duplicate,
        entity("Table", "db/s/x", source=other),  # another connection's entity
        entity("Table", "db/s/y", source=other, connectionQualifiedName=SOURCE),  # outside
        entity("Process", "db/p"),  # not a type this platform publishes
    ]
    monkeypatch.setattr(entities_module, "HELD_JSON_BYTES", 0)
    parsed = parse_files(
        [("transformed/x/entities.json", jsonl(batch))],
        VOLATILE,
        spill=tmp_path / "spill" if spilled else None,
    )
    assert parsed.spilled == spilled
    diff = diff_batch(parsed, empty_snapshot(), SOURCE, "full")
    assert isinstance(diff.changes, pl.LazyFrame) == spilled  # streamed from the rows' files
    assert parsed.frame.get_column("hash").null_count() == (parsed.frame.height if spilled else 0)

    by_reason: dict[str, list[tuple[int, str]]] = {}
    for issue in diff.issues:
        by_reason.setdefault(issue.reason, []).append((issue.line, issue.qualified_name))
    assert by_reason == {
        "wrong_source": [(11, f"{other}/db/s/x"), (12, f"{other}/db/s/y")],
        "unknown_type": [(13, f"{SOURCE}/db/p")],
        "conflicting_duplicate": [(3, f"{SOURCE}/db/s/t1"), (9, f"{SOURCE}/db/s/t1")],
    }
    created = ops_of(diff, "create")
    assert ("Table", f"{SOURCE}/db/s/t1") not in created  # neither version is published
    assert len(created) == 7  # the other 7 of small_source, the exact duplicate once
    assert diff.count("create") == 7 and diff.valid_entities == len(batch)
    assert all(not q.startswith(other) for _, q in created)


def test_unknown_type_is_isolated_by_rank_table():
    assert TYPE_RANK["Connection"] < TYPE_RANK["Database"] < TYPE_RANK["Schema"]
    assert TYPE_RANK["Schema"] < TYPE_RANK["Table"] < TYPE_RANK["TablePartition"]
    assert TYPE_RANK["TablePartition"] < TYPE_RANK["Column"]


# --- plan ------------------------------------------------------------------------------------


def reshaped_source() -> tuple[pl.DataFrame, ParsedEntities]:
    """Snapshot of small_source; the batch drops table t2 (3 deletes), adds db2 (4 creates)."""
    snapshot = published(parse(small_source()), SOURCE)
    batch = [e for e in small_source() if "/t2" not in e["attributes"]["qualifiedName"]]
    batch += [
        entity("Column", "db2/s/t/c"),
        entity("Table", "db2/s/t"),
        entity("Schema", "db2/s"),
        entity("Database", "db2"),
    ]
    return snapshot, parse(batch)


def test_plan_orders_parents_first_for_upserts_and_children_first_for_deletes():
    snapshot, batch = reshaped_source()
    diff = diff_batch(batch, snapshot, SOURCE, "full")
    plan = build_plan(diff, PK, base_serial=7, snapshot=snapshot)
    ops = plan.operations

    assert ops["seq"].to_list() == list(range(7))
    assert ops.select("op", "type_name", "qualified_name").rows() == [
        ("create", "Database", f"{SOURCE}/db2"),
        ("create", "Schema", f"{SOURCE}/db2/s"),
        ("create", "Table", f"{SOURCE}/db2/s/t"),
        ("create", "Column", f"{SOURCE}/db2/s/t/c"),
        ("delete", "Column", f"{SOURCE}/db/s/t2/c1"),
        ("delete", "Column", f"{SOURCE}/db/s/t2/c2"),
        ("delete", "Table", f"{SOURCE}/db/s/t2"),
    ]
    header = plan.header
    assert (header.creates, header.updates, header.deletes, header.unchanged) == (4, 0, 3, 5)
    assert header.base_serial == 7 and header.source == SOURCE and header.partition_key == PK
    assert header.batch_entities == 9 and header.snapshot_entities == 8
    assert header.operations == 7
    assert "`default/test/1/db2`" in preview(plan)
    # Edges: the new db2 subtree adds three, the deleted t2 and its columns take three away.
    assert (header.relationships_added, header.relationships_removed) == (3, 3)
    assert header.relationships_repointed == 0
    assert header.isolated == header.isolated_by_plan == 0


def test_plan_id_identifies_the_plan_by_content_and_base_serial(tmp_path):
    snapshot, batch = reshaped_source()
    diff = diff_batch(batch, snapshot, SOURCE, "full")

    def stored_id(diff: DiffResult, base_serial: int, partition_key: str = PK) -> str:
        plan = build_plan(diff, partition_key, base_serial=base_serial)
        return plan_id(base_serial, plan.stored_operations(tmp_path / str(uuid.uuid4())))

    assert stored_id(diff, 7) == stored_id(diff, 7, "other/wf/run")
    assert stored_id(diff, 7) != stored_id(diff, 8)
    changed = [
        entity("Table", "db/s/t1", description="x") if e["attributes"]["name"] == "t1" else e
        for e in small_source()
        if "/t2" not in e["attributes"]["qualifiedName"]
    ]
    assert stored_id(diff_batch(parse(changed), snapshot, SOURCE, "full"), 7) != stored_id(diff, 7)


def test_plan_ranks_every_sql_type_of_the_fixture():
    parsed = parse_files(sorted(upstream_data().items()), VOLATILE)
    plan = build_plan(diff_batch(parsed, empty_snapshot(), UPSTREAM_SOURCE, "full"), PK, 0)
    ranks = [TYPE_RANK[t] for t in plan.operations["type_name"]]
    assert ranks == sorted(ranks)
    assert plan.operations["type_name"][0] == "Database"
    assert plan.operations["type_name"][-1] == "Column"


def test_a_first_batch_is_listed_as_parsed_and_any_other_order_is_sorted():
    parsed = parse_files(sorted(upstream_data().items()), VOLATILE)
    diff = diff_batch(parsed, empty_snapshot(), UPSTREAM_SOURCE, "full")
    identities = ["type_name", "qualified_name"]
    # The parse lists a first batch in plan order: the changes are its rows as they are.
    assert diff.changes.select(identities).equals(parsed.frame.select(identities))
    # A frame in another order (a rollback's is the snapshot's) is put in plan order, each type
    # in the order of its lines.
    reversed_batch = ParsedEntities(parsed.frame.reverse(), [], parsed.lines)
    listed = diff_batch(reversed_batch, empty_snapshot(), UPSTREAM_SOURCE, "full").changes
    ranks = [TYPE_RANK[t] for t in listed["type_name"]]
    assert ranks == sorted(ranks) and len(ranks) == 38
    columns = listed.filter(pl.col("type_name") == "Column")["qualified_name"].to_list()
    assert (
        columns
        == parsed.frame.reverse()
        .filter(pl.col("type_name") == "Column")["qualified_name"]
        .to_list()
    )


def test_empty_plan_preview():
    snapshot = published(parse(small_source()), SOURCE)
    plan = build_plan(diff_batch(parse(small_source()), snapshot, SOURCE, "full"), PK, 1)
    assert plan.operations.height == 0
    assert "nothing to do" in preview(plan)
    assert all(
        c.passed
        for c in (
            check_scope(plan.header.source, plan.operations),
            check_deletion_safety(plan.header, 0.0),
            check_references(plan, snapshot),
            check_required_attributes(plan),
        )
    )


# --- checks ----------------------------------------------------------------------------------


def test_deletion_safety_holds_a_batch_above_the_threshold():
    snapshot, batch = reshaped_source()
    plan = build_plan(diff_batch(batch, snapshot, SOURCE, "full"), PK, 1)  # 3 of 8 = 37.5%

    held = check_deletion_safety(plan.header, threshold=0.3)
    assert not held.passed and held.blocking
    assert held.metadata["deletion_share"] == 0.375
    assert "held for an operator" in held.description

    allowed = check_deletion_safety(plan.header, threshold=0.5)
    assert allowed.passed and allowed.metadata["deletes"] == 3


def test_deletion_safety_holds_an_empty_full_batch_whatever_the_threshold():
    snapshot = published(parse(small_source()), SOURCE)
    plan = build_plan(diff_batch(parse([]), snapshot, SOURCE, "full"), PK, 1)
    assert plan.header.deletes == 8
    held = check_deletion_safety(plan.header, threshold=1.0)
    assert not held.passed and held.blocking
    assert "empty full batch" in held.description
    # An empty incremental batch deletes nothing and is fine.
    incremental = build_plan(diff_batch(parse([]), snapshot, SOURCE, "incremental"), PK, 1)
    assert check_deletion_safety(incremental.header, threshold=0.0).passed
    # The very first batch of a source has nothing to delete.
    first = build_plan(diff_batch(parse(small_source()), empty_snapshot(), SOURCE, "full"), PK, 0)
    assert check_deletion_safety(first.header, threshold=0.0).passed


def test_scope_check_catches_an_operation_outside_the_source():
    snapshot, batch = reshaped_source()
    plan = build_plan(diff_batch(batch, snapshot, SOURCE, "full"), PK, 1)
    assert check_scope(plan.header.source, plan.operations).passed

    # Screening keeps such rows out of a diff; the check is the last line of defence.
    intruder = entity("Table", "db/s/t", source="default/other/9")
    changes = pl.DataFrame(
        {
            "op": ["create", "update"],
            "type_name": ["Table", "Table"],
            "qualified_name": [intruder["attributes"]["qualifiedName"], f"{SOURCE}/db/s/ok"],
            "hash": ["h1", "h2"],
            "guid": [None, None],
            "entity": [
                orjson.dumps(intruder).decode(),
                # In the namespace by name but claiming another connection.
                orjson.dumps(
                    entity("Table", "db/s/ok", connectionQualifiedName="default/other/9")
                ).decode(),
            ],
            "references": [[], []],
            "raw_hash": [None, None],
            "missing": ["", ""],
        },
        schema=DIFF_SCHEMA,
    )
    diff = DiffResult(SOURCE, "full", changes, 2, 2, 0)
    plan = build_plan(diff, PK, 0)
    outcome = check_scope(plan.header.source, plan.operations)
    assert not outcome.passed and outcome.blocking
    assert outcome.metadata["out_of_scope"] == 2


def test_references_check_reports_dangling_references():
    snapshot, _ = reshaped_source()
    batch = [
        entity("Column", "db/s/t1/c3"),  # parent t1 is in the snapshot: resolves
        entity("Column", "db/s/t2/c3"),  # parent t2 is deleted by this batch: dangling
        entity("Column", "db/s/gone/c1"),  # parent never existed: dangling
        *[e for e in small_source() if "/t2" not in e["attributes"]["qualifiedName"]],
    ]
    plan = build_plan(diff_batch(parse(batch), snapshot, SOURCE, "full"), PK, 1, snapshot=snapshot)
    dangling = [f"{SOURCE}/db/s/gone/c1", f"{SOURCE}/db/s/t2/c3"]
    # The plan isolates them: they are not planned, the rest of the batch is.
    assert sorted(plan.isolated["qualified_name"]) == dangling
    assert set(plan.isolated["reason"]) == {"dangling_reference"}
    planned = set(plan.operations["qualified_name"])
    assert f"{SOURCE}/db/s/t1/c3" in planned and not planned.intersection(dangling)
    assert plan.header.isolated_by_plan == 2

    outcome = check_references(plan, snapshot)
    assert not outcome.passed
    assert not outcome.blocking  # reported; the rest of the batch is not held
    assert outcome.metadata["isolated_dangling"] == 2
    assert sorted(row[1] for row in outcome.metadata["examples"]) == dangling
    assert all(row[2] == "dangling_reference" for row in outcome.metadata["examples"])


def test_references_of_the_fixture_all_resolve():
    parsed = parse_files(sorted(upstream_data().items()), VOLATILE)
    plan = build_plan(diff_batch(parsed, empty_snapshot(), UPSTREAM_SOURCE, "full"), PK, 0)
    outcome = check_references(plan, empty_snapshot())
    assert outcome.passed
    assert outcome.metadata["references"] == 37


def test_required_attributes_check():
    batch = small_source()
    del batch[3]["attributes"]["name"]
    batch[4]["attributes"]["name"] = ""
    plan = build_plan(diff_batch(parse(batch), empty_snapshot(), SOURCE, "full"), PK, 0)
    lacking = {f"{SOURCE}/db/s/t1/c1", f"{SOURCE}/db/s/t1/c2"}
    assert set(plan.isolated["qualified_name"]) == lacking
    assert not lacking.intersection(plan.operations["qualified_name"])
    assert plan.header.creates == 6

    outcome = check_required_attributes(plan)
    assert not outcome.passed and not outcome.blocking
    assert outcome.metadata["isolated"] == 2
    assert outcome.metadata["planned_without_required"] == 0
    assert {example[1] for example in outcome.metadata["examples"]} == lacking
    assert all(
        example[2] == "missing_required_attribute"
        and example[3] == "missing required attribute(s): name"
        for example in outcome.metadata["examples"]
    )
