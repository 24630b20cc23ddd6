"""Publish: chunked execution with per-entity failure isolation, and the next snapshot."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import orjson
import polars as pl
import pytest

from publish_platform import publish
from publish_platform.diff import diff_batch
from publish_platform.entities import parse_files
from publish_platform.metastores.base import EntityWrite, Identity, WriteResult
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.plan import build_plan
from publish_platform.publish import RESULT_SCHEMA, execute_plan, next_snapshot
from publish_platform.state import SNAPSHOT_SCHEMA, empty_snapshot

from .support import UPSTREAM_SOURCE, VOLATILE, jsonl, upstream_data, upstream_entities

PK = "postgres/wf/run"


def qn(path: str) -> str:
    return f"{UPSTREAM_SOURCE}/shopdb/{path}"


class PoisonMetastore:
    """The SQL catalog, except that any chunk containing a poison entity fails as a whole."""

    def __init__(self, catalog: SqlCatalog, poison: set[str]) -> None:
        self.catalog = catalog
        self.poison = poison
        self.calls: list[tuple[str, int]] = []

    def _check(self, names: list[str]) -> None:
        bad = self.poison.intersection(names)
        if bad:
            raise RuntimeError(f"metastore rejected {sorted(bad)[0]}")

    def upsert(self, entities: Sequence[EntityWrite]) -> list[WriteResult]:
        self.calls.append(("upsert", len(entities)))
        self._check([e.qualified_name for e in entities])
        return self.catalog.upsert(entities)

    def delete(self, identities: Sequence[Identity], purge: bool = False) -> list[WriteResult]:
        self.calls.append(("delete", len(identities)))
        self._check([i.qualified_name for i in identities])
        return self.catalog.delete(identities, purge=purge)

    def dump(self, source=None):
        return self.catalog.dump(source)

    def close(self) -> None:
        self.catalog.close()


@pytest.fixture
def catalog(tmp_path):
    catalog = SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    yield catalog
    catalog.close()


def first_plan():
    parsed = parse_files(sorted(upstream_data().items()), VOLATILE)
    return build_plan(diff_batch(parsed, empty_snapshot(), UPSTREAM_SOURCE, "full"), PK, 0)


def test_poison_entity_is_isolated_and_the_rest_published(catalog):
    poison = qn("sales/orders/amount")
    metastore = PoisonMetastore(catalog, {poison})
    plan = first_plan()
    progress: list[tuple[int, int]] = []

    outcome = execute_plan(
        plan.operations, metastore, chunk_size=8, progress=lambda d, t: progress.append((d, t))
    )

    assert outcome.succeeded == 37 and outcome.failed == 1
    assert outcome.errors == [
        {
            "type_name": "Column",
            "qualified_name": poison,
            "error": f"RuntimeError: metastore rejected {poison}",
        }
    ]
    results = outcome.results
    assert results["seq"].to_list() == plan.operations["seq"].to_list()
    failed = results.join(plan.operations, on="seq").filter(~pl.col("ok"))
    assert failed["qualified_name"].to_list() == [poison]
    assert failed["guid"].to_list() == [None]
    assert results.filter(pl.col("ok"))["guid"].null_count() == 0
    # 5 chunks of at most 8; the poisoned one splits 8 -> 4 -> 2 -> 1.
    assert outcome.split_chunks == 3
    assert outcome.requests == 5 + 2 * 3
    assert progress[-1] == (38, 38)
    published = {e["attributes"]["qualifiedName"] for e in catalog.dump(UPSTREAM_SOURCE)}
    assert len(published) == 37 and poison not in published


def test_chunks_never_mix_upserts_and_deletes_and_respect_chunk_size(catalog):
    base = next_snapshot(empty_snapshot(), first_plan().operations, _all_ok(first_plan())).collect()
    kept = [e for e in upstream_entities() if "/hr/" not in e["attributes"]["qualifiedName"]]
    changed = copy.deepcopy(kept)
    for e in changed:
        e["attributes"]["description"] = "changed"
    parsed = parse_files([("f.json", jsonl(changed))], VOLATILE)
    plan = build_plan(diff_batch(parsed, base, UPSTREAM_SOURCE, "full"), PK, 1)
    assert (plan.header.updates, plan.header.deletes) == (32, 6)  # hr: table, 4 columns, procedure
    metastore = PoisonMetastore(catalog, set())

    outcome = execute_plan(plan.operations, metastore, chunk_size=10)

    assert outcome.failed == 0
    assert metastore.calls == [
        ("upsert", 10),
        ("upsert", 10),
        ("upsert", 10),
        ("upsert", 2),
        ("delete", 6),
    ]


def _all_ok(plan) -> pl.DataFrame:
    ops = plan.operations
    return pl.DataFrame(
        {
            "seq": ops["seq"],
            "ok": [True] * ops.height,
            "guid": [f"g-{q}" for q in ops["qualified_name"]],
            "error": [None] * ops.height,
        },
        schema={"seq": pl.Int64, "ok": pl.Boolean, "guid": pl.String, "error": pl.String},
    )


def test_next_snapshot_keeps_old_row_for_failed_update_and_omits_failed_create(catalog):
    first = first_plan()
    first_outcome = execute_plan(first.operations, catalog, chunk_size=100)
    base = next_snapshot(empty_snapshot(), first.operations, first_outcome.results).collect()
    assert base.height == 38 and base.columns == list(SNAPSHOT_SCHEMA)
    old = {r["qualified_name"]: r for r in base.iter_rows(named=True)}

    entities = []
    for original in upstream_entities():
        e = copy.deepcopy(original)
        name = e["attributes"]["qualifiedName"]
        if name in (qn("sales/orders"), qn("sales/customers")):
            e["attributes"]["description"] = "updated"
        if name in (qn("hr/employees/dept"), qn("hr/employees/salary")):
            continue  # deleted
        entities.append(e)
    for column in ("bonus", "grade"):
        new = copy.deepcopy(next(e for e in entities if e["typeName"] == "Column"))
        new["attributes"].update(qualifiedName=qn(f"hr/employees/{column}"), name=column)
        entities.append(new)
    parsed = parse_files([("f.json", jsonl(entities))], VOLATILE)
    plan = build_plan(diff_batch(parsed, base, UPSTREAM_SOURCE, "full"), PK, 1, snapshot=base)
    assert (plan.header.creates, plan.header.updates, plan.header.deletes) == (2, 2, 2)

    poison = {qn("sales/orders"), qn("hr/employees/bonus"), qn("hr/employees/salary")}
    outcome = execute_plan(plan.operations, PoisonMetastore(catalog, poison), chunk_size=100)
    assert outcome.failed == 3 and outcome.succeeded == 3

    snapshot = next_snapshot(base, plan.operations, outcome.results).collect()
    rows = {r["qualified_name"]: r for r in snapshot.iter_rows(named=True)}

    # Failed update: the old row, old hash, so the next batch sees it as changed and retries.
    assert rows[qn("sales/orders")] == old[qn("sales/orders")]
    # Successful update: new hash, same guid.
    assert rows[qn("sales/customers")]["hash"] != old[qn("sales/customers")]["hash"]
    assert rows[qn("sales/customers")]["guid"] == old[qn("sales/customers")]["guid"]
    # Failed create: absent. Successful create: present with the metastore's guid.
    assert qn("hr/employees/bonus") not in rows
    assert rows[qn("hr/employees/grade")]["guid"]
    # Failed delete: still there. Successful delete: gone.
    assert rows[qn("hr/employees/salary")] == old[qn("hr/employees/salary")]
    assert qn("hr/employees/dept") not in rows
    assert snapshot.height == 38 - 1 + 1
    assert snapshot.select("type_name", "qualified_name").is_duplicated().sum() == 0
    # The base's rows in their order, less those the plan changed, then the plan's in plan
    # order: the same plan on the same base gives the very same snapshot.
    applied = outcome.results.filter("ok").join(plan.operations, on="seq").sort("seq")
    changed = set(applied["qualified_name"])
    written = applied.filter(pl.col("op") != "delete")["qualified_name"].to_list()
    kept = [q for q in base["qualified_name"].to_list() if q not in changed]
    assert snapshot["qualified_name"].to_list() == kept + written
    assert next_snapshot(base, plan.operations, outcome.results).collect().equals(snapshot)


def test_purge_removes_and_archive_hides(catalog):
    plan = first_plan()
    execute_plan(plan.operations, catalog, chunk_size=50)
    base = next_snapshot(empty_snapshot(), plan.operations, _all_ok(plan)).collect()
    batch = [e for e in upstream_entities() if e["typeName"] != "Column"]
    deletes = build_plan(
        diff_batch(
            parse_files([("f.json", jsonl(batch))], VOLATILE), base, UPSTREAM_SOURCE, "full"
        ),
        PK,
        1,
    )
    assert deletes.header.deletes == 25
    outcome = execute_plan(deletes.operations, catalog, chunk_size=50, purge=True)
    assert outcome.failed == 0
    assert len(list(catalog.dump(UPSTREAM_SOURCE))) == 13
    assert len(catalog.versions(UPSTREAM_SOURCE)) == 13  # purged rows are gone entirely


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the publish path may catch it."""


class MemoryCheckpoint:
    def __init__(self) -> None:
        self.parts: list[pl.DataFrame] = []

    def done(self) -> pl.DataFrame:
        return pl.concat([pl.DataFrame(schema=RESULT_SCHEMA), *self.parts])

    def record(self, results: pl.DataFrame) -> None:
        self.parts.append(results)


class RecordingMetastore(PoisonMetastore):
    """Records what it applied, in order; dies at the given upsert call."""

    def __init__(self, catalog: SqlCatalog, poison: set[str], die_at: int | None = None) -> None:
        super().__init__(catalog, poison)
        self.applied: list[str] = []
        self.die_at = die_at

    def upsert(self, entities: Sequence[EntityWrite]) -> list[WriteResult]:
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise Killed()
        results = super().upsert(entities)
        self.applied.extend(e.qualified_name for e in entities)
        return results


def test_an_interrupted_execution_resumes_in_plan_order_from_its_checkpoint(catalog, tmp_path):
    plan = first_plan()
    checkpoint = MemoryCheckpoint()
    poison = plan.operations["qualified_name"][-1]  # past what is applied before it dies
    dying = RecordingMetastore(catalog, {poison}, die_at=3)
    with pytest.raises(Killed):
        execute_plan(plan.operations, dying, chunk_size=8, checkpoint=checkpoint)
    recorded = checkpoint.done()
    # Whole chunks were recorded, the chunk it died in not.
    done = recorded.height
    assert len(checkpoint.parts) >= 2 and done == 8 * len(checkpoint.parts) < 38
    assert recorded.filter(~pl.col("ok")).height == 0

    resumed = RecordingMetastore(catalog, {poison})
    # (Its results written to files, the resumed ones first, as the publish step does.)
    outcome = execute_plan(
        plan.operations, resumed, chunk_size=8, checkpoint=checkpoint, spill=tmp_path / "results"
    )

    assert outcome.resumed == done
    order = plan.operations["qualified_name"].to_list()
    assert resumed.applied == [q for q in order[done:] if q != poison]  # the rest, in order
    outcome.results = outcome.results.lazy().collect()
    assert outcome.results["seq"].to_list() == plan.operations["seq"].to_list()
    assert (outcome.succeeded, outcome.failed) == (37, 1)
    assert checkpoint.done().height == 38

    # Everything recorded, the failure included: a third run applies nothing.
    again = RecordingMetastore(catalog, set())
    final = execute_plan(plan.operations, again, chunk_size=8, checkpoint=checkpoint)
    assert again.applied == [] and final.resumed == 38 and final.failed == 1
    assert final.results.equals(outcome.results)


class EntityByEntityMetastore:
    """A metastore that reads the writes one EntityWrite at a time (as Atlan's does)."""

    def __init__(self) -> None:
        self.seen: list[EntityWrite] = []

    def upsert(self, entities: Sequence[EntityWrite]) -> list[WriteResult]:
        self.seen.extend(entities)
        assert entities[1:3] == [entities[1], entities[2]] and entities[-1] == self.seen[-1]
        return [
            WriteResult(e.type_name, e.qualified_name, True, f"g-{e.qualified_name}")
            for e in entities
        ]

    def delete(self, identities: Sequence[Identity], purge: bool = False) -> list[WriteResult]:
        return [WriteResult(i.type_name, i.qualified_name, True, i.guid) for i in identities]


def test_a_metastore_reading_entity_by_entity_gets_each_write_whole():
    """Chunks travel as columns; read one by one they are the EntityWrite objects of the plan."""
    operations = first_plan().operations
    metastore = EntityByEntityMetastore()

    outcome = execute_plan(operations, metastore, chunk_size=8, source=UPSTREAM_SOURCE)

    assert outcome.failed == 0
    expected = [
        EntityWrite(
            row["type_name"],
            row["qualified_name"],
            row["entity"],
            row["hash"],
            row["guid"],
            tuple(row["references"] or ()),
            UPSTREAM_SOURCE,
        )
        for row in operations.iter_rows(named=True)
    ]
    assert metastore.seen == expected
    assert any(w.references for w in metastore.seen)
    assert metastore.seen[0].entity == orjson.loads(operations.item(0, "entity"))


def test_references_travel_with_their_entity_through_splits_and_resumes(catalog):
    """A chunk's references are a slice of the plan's: they stay with their entities when a
    chunk splits around a failure and when a resumed publish starts part-way."""
    plan = first_plan()
    poison = qn("sales/orders/amount")
    checkpoint = MemoryCheckpoint()
    with pytest.raises(Killed):
        execute_plan(
            plan.operations,
            RecordingMetastore(catalog, {poison}, die_at=1),
            chunk_size=5,
            checkpoint=checkpoint,
        )
    outcome = execute_plan(
        plan.operations, PoisonMetastore(catalog, {poison}), chunk_size=5, checkpoint=checkpoint
    )

    assert outcome.resumed == 5 and outcome.split_chunks > 0 and outcome.failed == 1
    expected = {
        (
            row["type_name"],
            row["qualified_name"],
            r["attribute"],
            r["type_name"],
            r["qualified_name"],
        )
        for row in plan.operations.iter_rows(named=True)
        if row["qualified_name"] != poison
        for r in row["references"] or ()
    }
    assert expected and catalog.relationships(UPSTREAM_SOURCE) == expected


def test_a_stored_plan_is_executed_a_part_at_a_time_as_it_would_be_whole(
    tmp_path, catalog, monkeypatch
):
    """The publish step reads its plan from the file in parts, and writes the results of each
    part to a file (so its memory does not grow with the plan): entities, references, results
    and the next snapshot are what the plan in memory gives, and a failure in one part is
    isolated as in one plan."""
    monkeypatch.setattr(publish, "PLAN_PART_ROWS", 12)  # parts of 10 operations: 2 chunks of 5
    read: list[int] = []
    parts_of = publish._plan_parts

    def recorded(*args: object) -> Iterator[pl.DataFrame]:
        for part in parts_of(*args):  # type: ignore[arg-type]
            read.append(part.height)
            yield part

    monkeypatch.setattr(publish, "_plan_parts", recorded)
    plan = first_plan()
    stored = tmp_path / "plan.parquet"
    plan.operations.write_parquet(stored, row_group_size=3)
    whole, parted = EntityByEntityMetastore(), EntityByEntityMetastore()

    expected = execute_plan(plan.operations, whole, chunk_size=5, source=UPSTREAM_SOURCE)
    outcome = execute_plan(
        pl.scan_parquet(stored),
        parted,
        chunk_size=5,
        source=UPSTREAM_SOURCE,
        spill=tmp_path / "results",
    )

    assert read == [10, 10, 10, 8] + [10, 10, 10, 8]  # the plan in memory is sliced alike
    assert parted.seen == whole.seen and len(parted.seen) == 38
    assert isinstance(outcome.results, pl.LazyFrame)  # a file a part: none held
    assert len(list((tmp_path / "results").iterdir())) == 4
    assert outcome.results.collect().equals(expected.results)
    assert (outcome.succeeded, outcome.failed) == (38, 0)
    assert (
        next_snapshot(empty_snapshot(), pl.scan_parquet(stored), outcome.results)
        .collect(engine="streaming")
        .equals(next_snapshot(empty_snapshot(), plan.operations, expected.results).collect())
    )

    poison = qn("sales/orders/amount")
    isolated = execute_plan(
        pl.scan_parquet(stored),
        PoisonMetastore(catalog, {poison}),
        5,
        spill=tmp_path / "isolated-results",
    )
    assert (isolated.succeeded, isolated.failed) == (37, 1)
    assert isolated.errors[0]["qualified_name"] == poison


def test_next_snapshot_refuses_results_that_are_not_one_per_operation():
    """Results are set beside their operations by position: a missing or extra one would pair
    an entity with another's outcome and guid, so it is refused before anything is written."""
    plan = first_plan()
    results = _all_ok(plan)
    expected = next_snapshot(empty_snapshot(), plan.operations, results).collect()
    # In another order they are still one per operation: sorted, they give the same snapshot.
    assert (
        next_snapshot(empty_snapshot(), plan.operations, results.reverse())
        .collect()
        .equals(expected)
    )
    missing = results.slice(1)
    extra = pl.concat([results, results.tail(1)])
    of_other_operations = results.with_columns(pl.col("seq") + 1)
    for wrong in (missing, extra, of_other_operations):
        with pytest.raises(ValueError, match="not one per operation"):
            next_snapshot(empty_snapshot(), plan.operations, wrong)
