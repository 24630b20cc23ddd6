"""Lines recognised as unchanged by their raw hash are not parsed, and the diff is the same as if
they had been: same creates, updates, unchanged, deletes and isolation."""

from __future__ import annotations

import orjson
import polars as pl
import pytest

from publish_platform import diff as diff_module
from publish_platform.diff import SnapshotView, as_view, diff_batch, recognisable
from publish_platform.entities import RawHasher, parse_files
from publish_platform.plan import build_plan
from publish_platform.state import empty_snapshot, snapshot_parquet

from .support import SOURCE, VOLATILE, entity, jsonl, small_source
from .test_diff_plan import published


def resynced(entities: list[dict], run: str) -> list[dict]:
    return [
        {**e, "attributes": {**e["attributes"], "lastSyncRun": run, "lastSyncRunAt": 42}}
        for e in entities
    ]


def both_ways(lines: bytes, snapshot: pl.DataFrame, **diff: object):
    files = [("transformed/x/entities.json", lines)]
    fast = parse_files(files, VOLATILE, known_raw=recognisable(snapshot))
    slow = parse_files(files, VOLATILE)
    return (
        fast,
        diff_batch(fast, snapshot, SOURCE, "full", **diff),
        diff_batch(slow, snapshot, SOURCE, "full", **diff),
    )


def summary(diff) -> dict:
    changes = diff.changes.sort("type_name", "qualified_name")
    return {
        "ops": changes.select("op", "type_name", "qualified_name", "hash", "guid").rows(),
        "issues": sorted((i.reason, i.qualified_name or "") for i in diff.issues),
        "valid": diff.valid_entities,
        "unchanged": diff.count("unchanged"),
    }


def test_a_volatile_only_batch_is_recognised_without_parsing():
    first = small_source()
    snapshot = published(parse_files([("f", jsonl(first))], VOLATILE), SOURCE)
    assert snapshot["raw_hash"].null_count() == 0

    parsed, fast, slow = both_ways(jsonl(resynced(first, "run-2")), snapshot)

    assert parsed.unchanged.height == len(first) and parsed.frame.height == 0
    assert summary(fast) == summary(slow)
    assert fast.count("unchanged") == len(first)


def a_later_sync(first: list[dict]) -> list[dict]:
    """``first`` resynced: its last column gone, one entity changed, a column added, and the
    same identity twice (once unchanged, so recognised; once with other content)."""
    second = resynced(first[:-1], "run-2")
    second[3] = {**second[3], "attributes": {**second[3]["attributes"], "description": "new"}}
    second.append(entity("Column", "db/s/t1/c9"))
    twin = {**second[2], "attributes": {**second[2]["attributes"], "description": "twin"}}
    return [*second, twin]


def test_changed_added_deleted_and_conflicting_lines_are_found_as_without_the_shortcut():
    first = small_source()
    snapshot = published(parse_files([("f", jsonl(first))], VOLATILE), SOURCE)

    parsed, fast, slow = both_ways(jsonl(a_later_sync(first)), snapshot)

    assert parsed.unchanged.height == len(first) - 2  # one dropped, one changed
    assert summary(fast) == summary(slow)
    assert fast.count("create") == 1 and fast.count("update") == 1 and fast.count("delete") == 1
    assert [i.reason for i in fast.issues] == ["conflicting_duplicate"] * 2


def test_lines_compared_a_few_at_a_time_diff_as_all_at_once(monkeypatch):
    """A batch's lines are paired and compared with their snapshot rows a slice of
    DIFF_SLICE_ROWS at a time: one at a time, the same changes (the rows deleted or screened
    with a parsed line read whole, with their references)."""
    first = small_source()
    snapshot = published(parse_files([("f", jsonl(first))], VOLATILE), SOURCE)
    files = [("transformed/x/entities.json", jsonl(a_later_sync(first)))]
    parsed = parse_files(files, VOLATILE, known_raw=recognisable(snapshot))

    at_once = diff_batch(parsed, snapshot, SOURCE, "full")
    monkeypatch.setattr(diff_module, "DIFF_SLICE_ROWS", 1)
    sliced = diff_batch(parsed, snapshot, SOURCE, "full")

    assert parsed.frame.height == 3  # a slice each
    assert sliced.changes.equals(at_once.changes)
    assert (sliced.issues, sliced.unchanged) == (at_once.issues, at_once.unchanged)
    assert sliced.count("create") == 1 and sliced.count("update") == 1
    deleted = sliced.changes.filter(pl.col("op") == "delete")
    assert deleted.height == 1 and deleted.get_column("references").list.len().sum() > 0
    assert [i.reason for i in sliced.issues] == ["conflicting_duplicate"] * 2


def test_no_shortcut_when_forced_when_old_snapshots_lack_raw_hashes_or_volatile_settings_differ():
    first = small_source()
    snapshot = published(parse_files([("f", jsonl(first))], VOLATILE), SOURCE)
    lines = jsonl(resynced(first, "run-2"))

    fast = parse_files([("f", lines)], VOLATILE, known_raw=recognisable(snapshot))
    with pytest.raises(ValueError, match="forced"):
        diff_batch(fast, snapshot, SOURCE, "full", force=True)  # unparsed lines cannot be re-sent
    forced = diff_batch(parse_files([("f", lines)], VOLATILE), snapshot, SOURCE, "full", force=True)
    assert forced.count("update") == len(first)

    legacy = snapshot.with_columns(raw_hash=pl.lit(None, pl.UInt128))
    parsed, fast, slow = both_ways(lines, legacy)
    assert parsed.unchanged.height == 0 and summary(fast) == summary(slow)

    other_volatile = parse_files([("f", lines)], ("lastSyncRun",), known_raw=recognisable(snapshot))
    assert other_volatile.unchanged.height == 0


def test_the_raw_hash_ignores_volatile_values_only():
    hasher = RawHasher(VOLATILE)
    e = entity("Table", "db/s/t", description='say "hi"')
    line = orjson.dumps(e)
    assert hasher(line) == hasher(orjson.dumps(resynced([e], 'run "quoted" \\ 2')[0]))
    assert hasher(line) != hasher(orjson.dumps({**e, "status": "DELETED"}))
    nested = {**e, "attributes": {**e["attributes"], "x": {"lastSyncRun": "a"}}}
    # A volatile name twice: its raw hash is not kept, so nothing is ever recognised as it.
    assert parse_files([("f", jsonl([nested]))], VOLATILE).frame["raw_hash"].to_list() == [None]
    assert parse_files([("f", jsonl([e]))], VOLATILE).frame["raw_hash"].null_count() == 0
    assert hasher(b'{"typeName":"caf\xe9"}') is None  # not UTF-8: none
    assert hasher(b'{"typeName":"\x00"}') is None  # the cut mark itself: none
    assert empty_snapshot()["raw_hash"].dtype == pl.UInt128


def test_streamed_pieces_and_small_blocks_parse_like_the_whole_file(monkeypatch):
    """Lines cut across pieces and blocks, a line longer than a block, blank lines, CRLF, a
    line that is not UTF-8 and a last line without its newline: numbered and judged the same
    whether the file is held whole or streamed, whatever the block size."""
    entities = small_source()
    lines = [orjson.dumps(e) for e in entities]
    lines[3] = lines[3] + b"\r"
    lines.insert(5, b"")
    lines.insert(7, b'{"typeName": "Table", "attributes": {"qualifiedName": "caf\xe9"}}')
    lines.insert(
        9,
        orjson.dumps(
            {**entities[0], "attributes": {**entities[0]["attributes"], "description": "x" * 500}}
        ),
    )
    data = b"\n".join(lines)  # no newline after the last line
    snapshot = published(parse_files([("f", jsonl(entities))], VOLATILE), SOURCE)

    def outcome(parsed) -> tuple:
        return (
            parsed.lines,
            parsed.frame.select("line", "qualified_name", "hash", "raw_hash").rows(),
            parsed.unchanged.rows(),
            [(i.line, i.reason) for i in parsed.issues],
        )

    whole = outcome(parse_files([("f", data)], VOLATILE, known_raw=recognisable(snapshot)))
    monkeypatch.setattr("publish_platform.entities.BLOCK_BYTES", 100)
    for piece in (1, 7, 64, 1000):
        pieces = (data[i : i + piece] for i in range(0, len(data), piece))
        streamed = parse_files([("f", pieces)], VOLATILE, known_raw=recognisable(snapshot))
        assert outcome(streamed) == whole
        assert (
            outcome(parse_files([("f", data)], VOLATILE, known_raw=recognisable(snapshot))) == whole
        )
    assert whole[0] == len(lines) - 1  # the blank line is not counted
    assert (8, "malformed_json") in whole[3]
    assert len(whole[2]) == len(entities)  # however they end; the edited line is not


def test_the_raw_hash_is_the_same_in_another_process():
    """Snapshots written by one process are read by others: the raw hash must not depend on
    per-process state (a randomly seeded hash would never recognise a line)."""
    import subprocess
    import sys

    line = orjson.dumps(entity("Table", "db/s/t"))
    code = (
        "import sys; from publish_platform.entities import RawHasher;"
        f"print(RawHasher({sorted(VOLATILE)!r})(sys.stdin.buffer.read()))"
    )
    other = (
        subprocess.run([sys.executable, "-c", code], input=line, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )
    assert int(other) == RawHasher(VOLATILE)(line)


def test_a_snapshot_file_diffs_and_plans_like_the_frame_whatever_it_was_written_with(tmp_path):
    """The diff step reads the snapshot from a file (SnapshotView): rows by their raw hash,
    identities by their stored hashes. Files from before either existed, or from another polars,
    give the same diff and plan as the frame itself."""
    first = small_source()
    snapshot = published(parse_files([("f", jsonl(first))], VOLATILE), SOURCE)
    second = resynced(first[:-1], "run-2")
    second[3] = {**second[3], "attributes": {**second[3]["attributes"], "description": "new"}}
    second.append(entity("Column", "db/s/t1/c9"))
    twin = {**second[2], "attributes": {**second[2]["attributes"], "description": "twin"}}
    second.append(twin)
    lines = [("transformed/x/entities.json", jsonl(second))]

    snapshot_parquet(snapshot, tmp_path / "current.parquet")
    snapshot.drop("raw_hash").write_parquet(tmp_path / "no-raw-hashes.parquet")
    snapshot.write_parquet(tmp_path / "no-identity-hashes.parquet")
    some = snapshot.with_columns(  # rows of lines that named a volatile attribute twice
        raw_hash=pl.when(pl.int_range(pl.len()) % 2 == 0).then("raw_hash")
    )
    snapshot_parquet(some, tmp_path / "some-raw-hashes.parquet")

    def outcome(source: pl.DataFrame | SnapshotView) -> tuple:
        view = as_view(source)
        parsed = parse_files(lines, VOLATILE, known_raw=recognisable(view))
        diff = diff_batch(parsed, view, SOURCE, "full")
        plan = build_plan(diff, "app/wf/run-2", 1)
        operations = plan.operations.drop("entity", "raw_hash").rows()
        return summary(diff), operations, plan.edges_removed.collect().rows()

    expected = outcome(snapshot)
    assert expected[0]["ops"] and expected[2]  # something to compare: changes, removed edges
    for name in ("current", "no-raw-hashes", "no-identity-hashes", "some-raw-hashes"):
        assert outcome(SnapshotView(tmp_path / f"{name}.parquet")) == expected, name


def _without(e: dict, name: str, **custom: object) -> dict:
    """``e`` without its volatile attribute ``name``, with these custom attributes."""
    attributes = {k: v for k, v in e["attributes"].items() if k != name}
    return {**e, "attributes": attributes, "customAttributes": custom}


def test_a_change_in_a_nested_key_of_a_volatile_name_is_found_not_taken_for_unchanged():
    """Only an entity's own volatile attributes are not content. A line whose raw hash cut a
    nested key of a volatile name has none kept, so a later line that differs there (its value,
    or a key added) is parsed and found changed."""
    first = small_source()
    first[2] = _without(first[2], "lastSyncRunAt", lastSyncRunAt=1)
    first[3] = _without(first[3], "lastSyncRunAt", lastSyncRunAt=1)
    snapshot = published(parse_files([("f", jsonl(first))], VOLATILE), SOURCE)
    assert snapshot["raw_hash"].null_count() == 2

    second = resynced(first, "run-2")  # sets lastSyncRunAt on every entity: not content
    second[2] = _without(first[2], "lastSyncRunAt", lastSyncRunAt=2)
    second[3] = _without(first[3], "lastSyncRunAt", lastSyncRunAt=1, other=True)
    parsed, fast, slow = both_ways(jsonl(second), snapshot)

    assert summary(fast) == summary(slow)
    updated = fast.changes.filter(pl.col("op") == "update")["qualified_name"].to_list()
    assert updated == [
        first[2]["attributes"]["qualifiedName"],
        first[3]["attributes"]["qualifiedName"],
    ]
    assert parsed.unchanged.height == len(first) - 2
    # The line as it was: parsed too (no raw hash to recognise it by), and found unchanged.
    parsed, fast, _ = both_ways(jsonl([*second[:2], first[2], *second[3:]]), snapshot)
    assert fast.changes.filter(pl.col("op") == "update").height == 1
    assert parsed.unchanged.height == len(first) - 2
