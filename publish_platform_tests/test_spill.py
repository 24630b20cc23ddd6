"""The entity JSON of a batch spilled to disk while it is parsed, diffed and planned: the diff and
the plan stored are the same as when every entity is held in memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import polars as pl
import pytest

from publish_platform import entities as entities_module
from publish_platform.diff import diff_batch, read_changes, recognisable
from publish_platform.entities import REFERENCES, parse_files, with_entities
from publish_platform.plan import PLAN_SCHEMA, build_plan
from publish_platform.state import empty_snapshot, frame_parquet

from .support import UPSTREAM_SOURCE, VOLATILE, entity, jsonl, upstream_data, upstream_entities
from .test_diff_plan import PK, modified_fixture, published


def files(batch: list[dict]) -> list[tuple[str, bytes]]:
    return [("transformed/x/entities.json", jsonl(batch))]


def plans_both_ways(batch: list[tuple[str, bytes]], snapshot: pl.DataFrame, folder: Path):
    """The stored plan of ``batch`` against ``snapshot``, with the JSON in memory and spilled
    (then, as the steps do, streamed into a stored diff and planned from that file)."""
    known = recognisable(snapshot) if snapshot.height else None
    held = parse_files(batch, VOLATILE, known_raw=known)
    in_memory = build_plan(diff_batch(held, snapshot, UPSTREAM_SOURCE, "full"), PK, 1)

    parsed = parse_files(batch, VOLATILE, known_raw=known, spill=folder / "entities")
    assert parsed.spilled  # not held: a first batch's diff streams them from their files
    diff = diff_batch(parsed, snapshot, UPSTREAM_SOURCE, "full")
    assert isinstance(diff.changes, pl.LazyFrame) == (not snapshot.height)
    spilled_rows = parsed.frame.get_column("entity_row").is_not_null().sum()
    # Past the threshold every row is spilled, the ones held until then too.
    assert spilled_rows == parsed.frame.height == parsed.frame.get_column("entity").null_count()
    for waiting in ("references", "hash", "raw_hash"):  # with the JSON
        assert parsed.frame.get_column(waiting).null_count() == spilled_rows
    assert len(list((folder / "entities" / "rows").iterdir())) > 1  # the parsed rows, too
    stored = folder / "diff.parquet"
    frame_parquet(diff.stored_changes(folder / "diff-parts"), stored)
    # As the plan step does: the changes scanned from the file, which has their JSON.
    changes = read_changes(stored)
    spilled = build_plan(dataclasses.replace(diff, changes=changes, entities=None), PK, 1)
    return in_memory, spilled


@pytest.fixture(params=[0, 2_000], ids=["all-spilled", "some-held"])
def small_blocks(monkeypatch, request):
    """Blocks of a few lines: the spill is many files, read back across them. Spilled from the
    first block, or from a later one (the blocks held until then are spilled with it)."""
    monkeypatch.setattr(entities_module, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(entities_module, "HELD_JSON_BYTES", request.param)


def test_a_first_batch_spilled_plans_as_one_held_in_memory(tmp_path, small_blocks):
    batch = sorted(upstream_data().items())
    in_memory, spilled = plans_both_ways(batch, empty_snapshot(), tmp_path)

    assert len(list((tmp_path / "entities").iterdir())) > 3
    expected = in_memory.operations.select(list(PLAN_SCHEMA))
    assert spilled.stored_operations(tmp_path / "parts").collect().equals(expected)
    assert spilled.header == in_memory.header.model_copy(
        update={"created_at": spilled.header.created_at}
    )
    # Every planned entity is the line it came from, in the parents-first order.
    by_name = {
        orjson.loads(line)["attributes"]["qualifiedName"]: orjson.loads(line)
        for _, data in batch
        for line in data.splitlines()
        if line.strip()
    }
    for name, json in expected.select("qualified_name", "entity").rows():
        assert orjson.loads(json) == by_name[name]


def test_a_later_batch_spilled_plans_as_one_held_in_memory(tmp_path, small_blocks):
    snapshot = published(parse_files(sorted(upstream_data().items()), VOLATILE), UPSTREAM_SOURCE)
    later = modified_fixture()
    later.append(entity("Table", "shopdb/sales/refunds", source=UPSTREAM_SOURCE))
    del later[-1]["attributes"]["name"]  # isolated by the plan, from what the parse found
    in_memory, spilled = plans_both_ways(files(later), snapshot, tmp_path)

    header = spilled.header
    assert (header.creates, header.updates, header.deletes) == (1, 1, 1)
    assert header.isolated_by_plan == 1
    assert spilled.isolated.equals(in_memory.isolated)
    expected = in_memory.operations.select(list(PLAN_SCHEMA))
    assert spilled.stored_operations(tmp_path / "parts").collect().equals(expected)


def test_a_first_batch_spilled_isolates_dangling_references_as_one_held(tmp_path, small_blocks):
    """What dangles is found by streaming the references past the few targets that resolve
    nowhere: the same entities are isolated, the rest planned in the same order."""
    batch = [*upstream_entities()]
    missing_schema = f"{UPSTREAM_SOURCE}/shopdb/ghost"
    orphan = entity(
        "Table",
        "shopdb/ghost/orphan",
        source=UPSTREAM_SOURCE,
        atlanSchema={"typeName": "Schema", "uniqueAttributes": {"qualifiedName": missing_schema}},
    )
    child = entity("Column", "shopdb/ghost/orphan/c", source=UPSTREAM_SOURCE)  # dangles in turn
    batch[len(batch) // 2 : len(batch) // 2] = [orphan, child]
    in_memory, spilled = plans_both_ways(files(batch), empty_snapshot(), tmp_path)

    assert spilled.isolated.select("qualified_name").to_series().to_list() == [
        orphan["attributes"]["qualifiedName"],
        child["attributes"]["qualifiedName"],
    ]
    assert spilled.isolated.equals(in_memory.isolated)
    assert spilled.header.creates == len(batch) - 2
    expected = in_memory.operations.select(list(PLAN_SCHEMA))
    assert spilled.stored_operations(tmp_path / "parts").collect().equals(expected)


@pytest.mark.parametrize("sliced_chunk_rows", [0, 100], ids=["gathered", "sliced"])
def test_with_entities_reads_each_run_of_rows_in_order(tmp_path, monkeypatch, sliced_chunk_rows):
    monkeypatch.setattr(entities_module, "FILL_ROWS", 4)  # windows of 4 rows: 0-3, 4-7, 8-9
    # The frame's chunk (14 rows) is taken a part at a time by a gather, or by slices.
    monkeypatch.setattr(entities_module, "SLICED_CHUNK_ROWS", sliced_chunk_rows)
    spill = pl.DataFrame(
        {
            "type_name": ["Table"] * 10,
            "qualified_name": [f"t{i}" for i in range(10)],
            "entity": [f"e{i}" for i in range(10)],
            "references": [
                [{"attribute": "a", "type_name": "T", "qualified_name": f"r{i}"}] for i in range(10)
            ],
        },
        schema_overrides={"references": REFERENCES},
    )
    spill.head(4).write_parquet(tmp_path / "a.parquet")
    spill.tail(6).write_parquet(tmp_path / "b.parquet")
    rows = [None, 5, 7, 2, 3, None, None, 9, 9, 0, 1, 2, 3, 8]  # runs, nulls, a repeat
    held = {0: "held", 5: "held", 6: "held"}
    frame = pl.DataFrame(
        {
            "n": range(len(rows)),
            "entity": [held.get(n) for n in range(len(rows))],
            "references": pl.Series([[]] * len(rows), dtype=REFERENCES),
            "entity_row": pl.Series(rows, dtype=pl.UInt32),
        }
    )
    entities = pl.scan_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    filled = with_entities(frame, entities, tmp_path / "parts").collect()
    assert filled.columns == frame.columns
    assert filled["n"].to_list() == list(range(len(rows)))
    assert filled["entity"].to_list() == [held.get(n) or f"e{row}" for n, row in enumerate(rows)]
    # The references wait with the JSON: a held row keeps its own (none here).
    assert [
        [edge["qualified_name"] for edge in edges] for edges in filled["references"].to_list()
    ] == [[] if n in held else [f"r{row}"] for n, row in enumerate(rows)]
    # Rows that ascend within one window are one chunk, read by one slice: [5, 7], [2, 3],
    # [9], [9], [0, 1, 2, 3], [8]; and the two runs without JSON.
    assert len(list((tmp_path / "parts").iterdir())) == 8


def test_a_diff_stored_before_the_parse_checked_required_attributes_is_planned(tmp_path):
    """Stored by an earlier version, without ``missing``: the plan checks the JSON itself."""
    lacking = entity("Table", "shopdb/sales/refunds", source=UPSTREAM_SOURCE)
    del lacking["attributes"]["name"]
    parsed = parse_files(files([*modified_fixture(), lacking]), VOLATILE)
    diff = diff_batch(parsed, empty_snapshot(), UPSTREAM_SOURCE, "full")
    stored = tmp_path / "diff.parquet"
    diff.changes.drop("missing", "entity_row").write_parquet(stored)

    plan = build_plan(dataclasses.replace(diff, changes=read_changes(stored), entities=None), PK, 0)
    assert plan.isolated.select("qualified_name", "reason").rows() == [
        (lacking["attributes"]["qualifiedName"], "missing_required_attribute")
    ]
    expected = build_plan(diff, PK, 0).operations.select(list(PLAN_SCHEMA))
    assert plan.stored_operations(tmp_path / "parts").collect().equals(expected)
