"""Entities: parsing, validation with line numbers, canonical hashing, references."""

from __future__ import annotations

import copy
import subprocess
import sys

import orjson
import pytest

from publish_platform import entities as entities_module
from publish_platform.entities import (
    MAX_DEPTH,
    HashIndex,
    canonical_json,
    content_hash,
    line_blocks,
    parse_files,
    references_of,
    type_rank,
)

from .support import SEED_SAMPLE, SOURCE, VOLATILE, entity, jsonl, upstream_data, upstream_entities

VOLATILE_SET = frozenset(VOLATILE)


def reorder(value):
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


def test_hash_ignores_key_order_and_volatile_attributes():
    for original in upstream_entities():
        expected = content_hash(original, VOLATILE_SET)
        assert content_hash(reorder(original), VOLATILE_SET) == expected

        resynced = copy.deepcopy(original)
        resynced["attributes"]["lastSyncRun"] = "another-run"
        resynced["attributes"]["lastSyncRunAt"] = 1
        resynced["attributes"]["lastSyncWorkflowName"] = "another-workflow"
        assert content_hash(resynced, VOLATILE_SET) == expected
        # Without the volatile list these are real differences.
        assert content_hash(resynced, frozenset()) != content_hash(original, frozenset())


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e["attributes"].__setitem__("description", "now documented"),
        lambda e: e["attributes"].__setitem__("name", e["attributes"]["name"] + "_renamed"),
        lambda e: e["customAttributes"].__setitem__("is_nullable", "NO"),
        lambda e: e["attributes"].pop("connectionName"),
        lambda e: e.__setitem__("status", "DELETED"),
        lambda e: e["attributes"]["table"]["uniqueAttributes"].__setitem__("qualifiedName", "x"),
        lambda e: e["attributes"].__setitem__("lastSyncRunAtX", 1),  # not a volatile name
    ],
)
def test_hash_changes_on_real_change(change):
    column = next(e for e in upstream_entities() if e["typeName"] == "Column")
    changed = copy.deepcopy(column)
    change(changed)
    assert content_hash(changed, VOLATILE_SET) != content_hash(column, VOLATILE_SET)


def test_explicit_null_differs_from_absent_attribute():
    with_null = entity("Table", "db/s/t", description=None)
    without = entity("Table", "db/s/t")
    assert content_hash(with_null, VOLATILE_SET) != content_hash(without, VOLATILE_SET)


def test_hash_is_stable_across_processes_and_pinned():
    """Persisted in snapshots: the same value in a fresh interpreter, and a known constant."""
    sample = {"typeName": "Table", "attributes": {"qualifiedName": "a/b", "n": 1, "x": [1.5, None]}}
    here = content_hash(sample, VOLATILE_SET)
    code = (
        "from publish_platform.entities import content_hash;"
        f"print(content_hash({sample!r}, frozenset({list(VOLATILE)!r})))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.strip()
    assert other == here
    assert canonical_json(sample) == (
        b'{"attributes":{"n":1,"qualifiedName":"a/b","x":[1.5,null]},"typeName":"Table"}'
    )
    # BLAKE2b-128 of exactly that canonical JSON: any library or option drift shows up here.
    assert here == "448d5277ef9c640348952f69c8c237c4"


def test_parse_real_fixture_run():
    files = sorted(upstream_data().items())
    parsed = parse_files(files, VOLATILE)
    assert parsed.issues == []
    assert parsed.lines == 38
    assert parsed.frame.height == 38
    assert parsed.frame["hash"].n_unique() == 38
    assert parsed.last_sync_ms == max(e["attributes"]["lastSyncRunAt"] for e in upstream_entities())
    # Parents first (the order of a plan's creates), each type in the order of its lines.
    order = parsed.frame.select(rank=type_rank(), file="source_file", line="line")
    assert order.equals(order.sort("rank", "file", "line"))
    assert order.get_column("rank").n_unique() == 5
    first = parsed.frame.row(0, named=True)
    assert (first["source_file"], first["line"]) == ("transformed/database/entities.json", 1)
    # The stored entity is the canonical JSON of the input, volatile attributes included.
    database = upstream_data()["transformed/database/entities.json"]
    assert orjson.loads(first["entity"]) == orjson.loads(database.splitlines()[0])


def test_parse_seed_sample():
    parsed = parse_files([("entities.jsonl", SEED_SAMPLE.read_bytes())], VOLATILE)
    assert parsed.issues == []
    assert sorted(parsed.frame["type_name"]) == [
        "Column",
        "Database",
        "Procedure",
        "Schema",
        "Table",
        "View",
    ]


def test_bad_lines_become_issues_with_reasons_and_line_numbers():
    good = entity("Table", "db/s/t")
    lines = [
        orjson.dumps(good),  # 1
        b'{"typeName": "Table", "attributes": {',  # 2 truncated
        b"",  # 3 blank: skipped, not counted
        orjson.dumps({"attributes": {"qualifiedName": f"{SOURCE}/x"}}),  # 4
        orjson.dumps({"typeName": "Table", "attributes": {"name": "x"}}),  # 5
        b'{"typeName": "Table", "attributes": {"qualifiedName": "caf\xe9"}}',  # 6 latin-1
        b"x" * 2000,  # 7 over size
        b"[1, 2]",  # 8 not an object
        orjson.dumps({"typeName": "Table"}),  # 9 no attributes
        orjson.dumps(
            {"typeName": "Table", "attributes": {"qualifiedName": f"{SOURCE}/db/s/u"}}
        ),  # 10 no connection
        orjson.dumps({"typeName": "", "attributes": {"qualifiedName": "q"}}),  # 11
        orjson.dumps(entity("Column", "db/s/t/c")),  # 12
    ]
    parsed = parse_files([("transformed/t/entities.json", b"\n".join(lines))], VOLATILE, 1000)

    assert parsed.lines == 11
    assert parsed.frame["line"].to_list() == [1, 12]
    reasons = {issue.line: issue.reason for issue in parsed.issues}
    assert reasons == {
        2: "malformed_json",
        4: "missing_type_name",
        5: "missing_qualified_name",
        6: "malformed_json",
        7: "line_too_large",
        8: "malformed_json",
        9: "missing_attributes",
        10: "missing_connection",
        11: "missing_type_name",
    }
    by_line = {issue.line: issue for issue in parsed.issues}
    assert all(i.source_file == "transformed/t/entities.json" for i in parsed.issues)
    assert "2000 bytes exceeds 1000" in by_line[7].message
    # Whatever identity a bad line has is kept, so its absence is not taken for a deletion.
    assert (by_line[10].type_name, by_line[10].qualified_name) == ("Table", f"{SOURCE}/db/s/u")
    assert by_line[5].type_name == "Table" and by_line[5].qualified_name is None
    assert by_line[4].qualified_name == f"{SOURCE}/x" and by_line[4].type_name is None
    assert by_line[2].as_dict()["reason"] == "malformed_json"


def nested_line(levels: int) -> bytes:
    """An entity nesting ``levels`` objects in one attribute, written as text."""
    line = orjson.dumps(entity("Table", "db/s/deep")).decode()
    nested = '{"a":' * levels + "1" + "}" * levels
    return line.replace('"customAttributes":{}', f'"customAttributes":{nested}').encode()


@pytest.mark.parametrize("levels", [MAX_DEPTH - 1, MAX_DEPTH, 1000, 10_000])
def test_deep_nesting_is_isolated_never_a_crash(levels):
    """orjson parses 1024 levels but serializes only 254: a line between the two used to crash
    the whole diff (TypeError: Recursion limit reached) instead of being isolated."""
    depth = levels + 1  # with the entity around them
    parsed = parse_files([("f.json", nested_line(levels) + b"\n")], VOLATILE)
    if depth <= MAX_DEPTH:
        assert parsed.issues == [] and parsed.frame.height == 1
        return
    (issue,) = parsed.issues
    assert parsed.frame.height == 0
    assert (issue.line, issue.reason) == (1, "too_deeply_nested")
    assert f"JSON nested deeper than {MAX_DEPTH} levels" in issue.message
    # Parsed (up to 1024 levels), it keeps its identity: its absence is not a deletion.
    identified = ("Table", f"{SOURCE}/db/s/deep") if depth <= 1024 else (None, None)
    assert (issue.type_name, issue.qualified_name) == identified


def test_crlf_line_endings_parse():
    data = jsonl([entity("Table", "db/s/t"), entity("Column", "db/s/t/c")]).replace(b"\n", b"\r\n")
    parsed = parse_files([("f.json", data)], VOLATILE)
    assert parsed.issues == []
    assert parsed.frame.height == 2


def test_references_are_extracted_from_single_and_list_attributes():
    attributes = {
        "qualifiedName": "q",
        "atlanSchema": {"typeName": "Schema", "uniqueAttributes": {"qualifiedName": "s"}},
        "inputToProcesses": [
            {"typeName": "Process", "uniqueAttributes": {"qualifiedName": "p1"}},
            {"typeName": "Process", "uniqueAttributes": {"qualifiedName": "p2"}},
        ],
        "view": None,
        "tableName": "t",
        "broken": {"typeName": "Table", "uniqueAttributes": None},
        "noType": {"uniqueAttributes": {"qualifiedName": "x"}},
    }
    assert references_of(attributes) == [
        {"attribute": "atlanSchema", "type_name": "Schema", "qualified_name": "s"},
        {"attribute": "inputToProcesses", "type_name": "Process", "qualified_name": "p1"},
        {"attribute": "inputToProcesses", "type_name": "Process", "qualified_name": "p2"},
    ]


def test_references_of_real_fixture_in_parsed_frame():
    parsed = parse_files(sorted(upstream_data().items()), VOLATILE)
    refs = {
        (row["type_name"], row["qualified_name"]): row["references"]
        for row in parsed.frame.iter_rows(named=True)
    }
    partition = refs[("TablePartition", "default/postgres/1745501106/shopdb/sales/orders_open")]
    assert partition == [
        {
            "attribute": "parentTable",
            "type_name": "Table",
            "qualified_name": "default/postgres/1745501106/shopdb/sales/orders",
        }
    ]
    assert refs[("Database", "default/postgres/1745501106/shopdb")] == []
    assert sum(len(r) for r in refs.values()) == 37  # every entity but the database has a parent


def test_hash_index_finds_every_hash_exactly_even_when_high_halves_collide() -> None:
    """Uniform hashes, hashes sharing their high half (one bucket, sorted by that half only),
    an unknown hash, a null and an empty index."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(7)
    high = np.concatenate(
        [rng.integers(0, 2**63, 5000, dtype=np.uint64), np.full(4, 2**62, dtype=np.uint64)]
    )
    low = np.concatenate(
        [rng.integers(0, 2**63, 5000, dtype=np.uint64), np.array([9, 3, 7, 1], dtype=np.uint64)]
    )
    index = HashIndex(high, low)

    def as_hashes(high: np.ndarray, low: np.ndarray) -> pl.Series:
        frame = pl.DataFrame({"high": high, "low": low})
        return frame.select(pl.col("high").cast(pl.UInt128) * 2**64 + pl.col("low")).to_series()

    order = rng.permutation(len(high))
    assert (index.find(as_hashes(high[order], low[order])) == order).all()
    probes = as_hashes(np.array([2**62, 5], dtype=np.uint64), np.array([8, 5], dtype=np.uint64))
    assert index.find(pl.concat([probes, pl.Series([None], dtype=pl.UInt128)])).tolist() == [
        -1,
        -1,
        -1,
    ]
    empty = HashIndex(np.array([], dtype=np.uint64), np.array([], dtype=np.uint64))
    assert empty.find(probes).tolist() == [-1, -1]
    # Rows without a hash left out: each hash finds the row it was given for.
    rows = np.flatnonzero(rng.random(len(high)) < 0.5)
    sparse = HashIndex(high[rows], low[rows], rows)
    expected = np.full(len(high), -1)
    expected[rows] = rows
    assert (sparse.find(as_hashes(high, low)) == expected).all()


def test_parsed_entities_are_one_chunk_so_joins_share_their_json() -> None:
    """Each block of lines becomes a frame; the batch's is one chunk of them all. polars copies
    the strings of a frame of many chunks on every join and gather: the diff and the plan would
    each hold one more copy of the changed entities' JSON."""
    entities = upstream_entities()
    files = [(f"part-{n}.json", jsonl(entities[n::3])) for n in range(3)]
    parsed = parse_files(files, VOLATILE)
    assert parsed.frame.height == len(entities)
    assert parsed.frame.n_chunks() == 1


@pytest.mark.parametrize("piece", [1, 7, 64, 1000])
def test_streamed_pieces_become_blocks_of_whole_lines_with_every_byte_once(
    monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    """Pieces cut anywhere (within a line, at its newline, one line over many pieces), with or
    without a last newline: the blocks hold every byte once, in order, each of whole lines."""
    monkeypatch.setattr(entities_module, "BLOCK_BYTES", 256)
    for data in (
        b"".join(b'{"n": %d, "pad": "%s"}\n' % (n, b"x" * (n * 37 % 300)) for n in range(60)),
        b'{"a": 1}\n\n{"b": "' + b"y" * 900 + b'"}\n{"c": 3}',  # a blank line, no last newline
    ):
        pieces = [data[start : start + piece] for start in range(0, len(data), piece)]
        blocks = list(line_blocks(iter(pieces)))
        assert b"".join(bytes(part) for block in blocks for part in block) == data
        for block in blocks[:-1]:
            assert bytes(block[-1]).endswith(b"\n")
        assert len(blocks) > 1
