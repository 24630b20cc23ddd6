"""The state store over a real S3 API: immutable snapshots, compare-and-swap pointer, safe keys."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from publish_platform.diff import SnapshotView, paired_rows
from publish_platform.state import (
    ROW_GROUP_ROWS,
    Pointer,
    StaleStateError,
    StateStore,
    empty_snapshot,
    identity_hash,
    load_snapshot,
    scan_snapshot,
    snapshot_parquet,
    source_segment,
)

from .support import SOURCE

SNAPSHOT = pl.DataFrame(
    {
        "type_name": ["Database", "Schema"],
        "qualified_name": [f"{SOURCE}/db", f"{SOURCE}/db/s"],
        "hash": ["h1", "h2"],
        "guid": ["g1", None],
        "entity": ['{"typeName":"Database"}', '{"typeName":"Schema"}'],
        "references": [
            [],
            [{"attribute": "database", "type_name": "Database", "qualified_name": f"{SOURCE}/db"}],
        ],
        "raw_hash": [2**100 + 7, None],
    },
    schema=empty_snapshot().schema,
)


@pytest.fixture
def store(s3, settings) -> StateStore:
    return StateStore(s3, settings.state_location)


def pointer(serial: int, source: str = SOURCE, snapshot_key: str | None = None) -> Pointer:
    return Pointer(
        source=source,
        serial=serial,
        snapshot_key=snapshot_key or f"snapshots/{serial}",
        partition_key=f"app/wf/run-{serial}",
        published_at=datetime.now(UTC),
        entities=serial,
    )


def test_snapshot_candidates_are_immutable_and_the_pointer_commits_one(store, tmp_path):
    key = store.write_snapshot(SOURCE, 1, SNAPSHOT, "plan-a")
    assert key.endswith("/snapshots/000000000001-plan-a.parquet")
    assert load_snapshot(store.get_bytes(key)[0]).equals(SNAPSHOT)

    with pytest.raises(StaleStateError, match="exists with other content"):
        store.write_snapshot(SOURCE, 1, SNAPSHOT.head(1), "plan-a")
    assert load_snapshot(store.get_bytes(key)[0]).equals(SNAPSHOT)  # the first write stands
    # The very same snapshot again is a retry of the same publish, not a competitor: in any
    # row order, from a file (as the publish step writes it), or lazily.
    assert store.write_snapshot(SOURCE, 1, SNAPSHOT, "plan-a") == key
    assert store.write_snapshot(SOURCE, 1, SNAPSHOT.reverse().lazy(), "plan-a") == key
    snapshot_parquet(SNAPSHOT, tmp_path / "same.parquet")
    assert store.write_snapshot(SOURCE, 1, tmp_path / "same.parquet", "plan-a") == key
    changed = SNAPSHOT.with_columns(pl.col("guid").reverse())  # same rows but one column
    with pytest.raises(StaleStateError, match="exists with other content"):
        store.write_snapshot(SOURCE, 1, changed, "plan-a")
    # Another plan racing for the same serial writes a candidate of its own.
    other = store.write_snapshot(SOURCE, 1, SNAPSHOT.head(1), "plan-b")
    assert other != key

    # Nothing is committed until the pointer says so; then serial 1 is plan-a's candidate.
    with pytest.raises(FileNotFoundError):
        store.read_snapshot(SOURCE, 1)
    store.advance_pointer(pointer(1, snapshot_key=key), expected_serial=0)
    assert store.snapshot_key_of(SOURCE, 1) == key
    assert store.read_snapshot(SOURCE, 1).equals(SNAPSHOT)


def test_history_keeps_every_committed_serial_readable(store):
    first = store.write_snapshot(SOURCE, 1, SNAPSHOT, "p1")
    store.advance_pointer(pointer(1, snapshot_key=first), expected_serial=0)
    second = store.write_snapshot(SOURCE, 2, SNAPSHOT.head(1), "p2")
    store.advance_pointer(pointer(2, snapshot_key=second), expected_serial=1)

    history = store.history(SOURCE)
    assert [(p.serial, p.snapshot_key) for p in history] == [(1, first), (2, second)]
    assert [p.partition_key for p in history] == ["app/wf/run-1", "app/wf/run-2"]
    # The older serial stays readable after a newer one is current.
    assert store.read_snapshot(SOURCE, 1).equals(SNAPSHOT)
    assert store.read_snapshot(SOURCE, 2).equals(SNAPSHOT.head(1))
    with pytest.raises(FileNotFoundError, match="no committed snapshot 3"):
        store.read_snapshot(SOURCE, 3)
    assert store.history("default/never/1") == []


def test_snapshots_read_without_payload_and_from_before_raw_hashes(store):
    key = store.write_snapshot(SOURCE, 1, SNAPSHOT, "p1")
    store.advance_pointer(pointer(1, snapshot_key=key), expected_serial=0)
    light = store.read_snapshot(SOURCE, 1, payload=False)
    assert light["entity"].null_count() == 2
    assert light.drop("entity").equals(SNAPSHOT.drop("entity"))

    # A snapshot written before raw hashes existed reads with them null, with or without payload.
    legacy_key = store.source_key(SOURCE, "snapshots", "legacy.parquet")
    store.put_frame(legacy_key, SNAPSHOT.drop("raw_hash"))
    store.advance_pointer(pointer(2, snapshot_key=legacy_key), expected_serial=1)
    for payload in (True, False):
        legacy = store.read_snapshot(SOURCE, 2, payload=payload)
        assert legacy.columns == list(SNAPSHOT.columns)
        assert legacy["raw_hash"].null_count() == 2

    # Raw hashes of the first kind (text) could never match a line's: they read as null.
    textual_key = store.source_key(SOURCE, "snapshots", "textual.parquet")
    store.put_frame(textual_key, SNAPSHOT.with_columns(raw_hash=pl.lit("9f86d081884c7d65")))
    store.advance_pointer(pointer(3, snapshot_key=textual_key), expected_serial=2)
    textual = store.read_snapshot(SOURCE, 3, payload=False)
    assert textual.schema == SNAPSHOT.schema and textual["raw_hash"].null_count() == 2


def test_identity_hashes_are_stored_and_used_only_by_the_polars_that_wrote_them(tmp_path):
    expected = SNAPSHOT.select(identity_hash()).to_series()
    snapshot_parquet(SNAPSHOT, tmp_path / "current.parquet")
    stored = pl.read_parquet(tmp_path / "current.parquet", columns=["identity_hash"])
    assert stored.to_series().equals(expected)

    # Written by another polars (its hash may differ), or before identity hashes were stored:
    # computed again from the identities.
    other = SNAPSHOT.with_columns(identity_hash=pl.lit(7, pl.UInt128))
    other.write_parquet(tmp_path / "other.parquet", metadata={"identity_hash": "polars 0.0.1"})
    SNAPSHOT.write_parquet(tmp_path / "older.parquet")
    for name in ("current", "other", "older"):
        scanned = scan_snapshot(tmp_path / f"{name}.parquet", row_index="row").collect()
        assert scanned.columns == ["row", *SNAPSHOT.columns, "identity_hash"]
        assert scanned["identity_hash"].equals(expected, check_names=False), name
        assert scanned["entity"].null_count() == 2  # no payload unless asked
        # A diff reads rows by their identity hashes, whichever way they were had.
        view = SnapshotView(tmp_path / f"{name}.parquet")
        read = view.rows(np.array([1]))
        assert read.select("type_name", "qualified_name").rows() == [SNAPSHOT.row(1)[:2]], name
        assert view.rows_of(SNAPSHOT.select("type_name", "qualified_name")).height == 2, name


def test_a_line_is_paired_only_with_the_row_of_its_very_identity():
    """A hash names a row; the pair holds only if that row was read and has the line's identity
    (a hash shared by two identities pairs neither wrongly)."""
    rows = pl.DataFrame(
        {"snapshot_row": [2, 5, 7], "type_name": ["Table", "Column", "Table"]}
        | {"qualified_name": ["t/a", "t/a/b", "t/c"]},
        schema_overrides={"snapshot_row": pl.UInt32},
    )
    lines = pl.DataFrame(
        {"type_name": ["Column", "Table", "Table", "Table", "Table"]}
        | {"qualified_name": ["t/a/b", "t/c", "t/x", "t/a", "t/d"]}
    )
    found = np.array([5, 7, 2, -1, 6])  # t/x's hash names t/a's row; row 6 was not read
    assert paired_rows(lines, found, rows).tolist() == [1, 2, -1, -1, -1]
    assert paired_rows(lines, np.full(5, -1), rows.clear()).tolist() == [-1] * 5


def test_references_are_stored_as_text_and_read_back_from_snapshots_of_any_age(tmp_path):
    """Text, so a row filter decodes them only where a row matches; snapshots written with
    nested references (before) read the same."""
    reference = {"attribute": "database", "type_name": "Database", "qualified_name": f"{SOURCE}/db"}
    tricky = pl.DataFrame(
        {
            "type_name": ["Database", "Schema", "Table"],
            "qualified_name": [f"{SOURCE}/db", f"{SOURCE}/db/s", f'{SOURCE}/"quoted"\\ünï/t'],
            "hash": ["h1", "h2", "h3"],
            "guid": ["g1", None, "g3"],
            "entity": ["{}", "{}", "{}"],
            "references": [[], [reference, {**reference, "attribute": 'ünï \\ "'}], None],
            "raw_hash": [2**100 + 7, None, 2**127],
        },
        schema=empty_snapshot().schema,
    )
    snapshot_parquet(tricky, tmp_path / "current.parquet")
    stored = pl.read_parquet_schema(tmp_path / "current.parquet")
    assert "references" not in stored and stored["references_json"] == pl.String
    tricky.write_parquet(tmp_path / "nested.parquet")  # references as they were stored before
    for name in ("current", "nested"):
        assert load_snapshot(tmp_path / f"{name}.parquet").equals(tricky), name
        scanned = scan_snapshot(tmp_path / f"{name}.parquet", row_index="row")
        row = scanned.filter(pl.col("type_name") == "Schema").collect()
        assert row.get_column("references").equals(tricky.get_column("references")[1:2])


def test_serial_zero_is_the_empty_snapshot(store):
    assert store.current_serial(SOURCE) == 0
    assert store.read_pointer(SOURCE) is None
    snapshot = store.read_snapshot(SOURCE, 0)
    assert snapshot.height == 0 and snapshot.schema == SNAPSHOT.schema
    with pytest.raises(FileNotFoundError):
        store.read_snapshot(SOURCE, 5)


def test_pointer_advances_only_from_the_expected_serial(store):
    store.advance_pointer(pointer(1), expected_serial=0)
    assert store.current_serial(SOURCE) == 1

    with pytest.raises(StaleStateError, match="at serial 1, plan expected 0"):
        store.advance_pointer(pointer(1), expected_serial=0)  # a retried old batch
    with pytest.raises(StaleStateError):
        store.advance_pointer(pointer(3), expected_serial=2)  # ahead of reality
    assert store.current_serial(SOURCE) == 1

    store.advance_pointer(pointer(2), expected_serial=1)
    found = store.read_pointer(SOURCE)
    assert found is not None
    assert found[0].serial == 2 and found[0].partition_key == "app/wf/run-2"


def test_pointer_write_is_a_compare_and_swap_in_s3(store, monkeypatch):
    """Two publishers read serial 1; the second one's conditional write must fail."""
    store.advance_pointer(pointer(1), expected_serial=0)
    seen_by_both = store.read_pointer(SOURCE)
    store.advance_pointer(pointer(2), expected_serial=1)  # the first publisher wins

    monkeypatch.setattr(store, "read_pointer", lambda source: seen_by_both)
    with pytest.raises(StaleStateError, match="moved during publish"):
        store.advance_pointer(pointer(2), expected_serial=1)
    monkeypatch.undo()
    assert store.read_pointer(SOURCE)[0].partition_key == "app/wf/run-2"


def test_first_pointer_is_created_only_once(store, monkeypatch):
    """Two first publishers both saw no pointer: If-None-Match lets only one create it."""
    store.advance_pointer(pointer(1), expected_serial=0)
    monkeypatch.setattr(store, "read_pointer", lambda source: None)
    with pytest.raises(StaleStateError, match="moved during publish"):
        store.advance_pointer(pointer(1), expected_serial=0)


@pytest.mark.parametrize(
    "source",
    ["../x", "a/b", "..", ".", "default/postgres/1745501106", "x/../../sources/y", "a%2Fb", "é/ü"],
)
def test_source_segment_cannot_escape_its_prefix(source, store):
    segment = source_segment(source)
    assert "/" not in segment
    assert "." not in segment  # so never '.' or '..'
    assert store.location.prefix == ""
    assert store.source_key(source, "pointer.json") == f"sources/{segment}/pointer.json"
    prefix = f"sources/{segment}/"
    assert store.snapshot_key(source, 3, "p") == prefix + "snapshots/000000000003-p.parquet"
    assert store.history_key(source, 3) == prefix + "history/000000000003.json"


def test_source_segments_are_distinct_and_reversible(store):
    sources = ["a/b", "a%2Fb", "a.b", "a%2Eb", "../x", "default/postgres/1745501106"]
    assert len({source_segment(s) for s in sources}) == len(sources)
    for serial, source in enumerate(sources, start=1):
        store.advance_pointer(pointer(serial, source), expected_serial=0)
    assert sorted(store.list_sources()) == sorted(sources)
    for serial, source in enumerate(sources, start=1):
        assert store.current_serial(source) == serial


def test_empty_source_is_refused():
    with pytest.raises(ValueError):
        source_segment("")


def test_state_under_a_prefix(s3, settings):
    from publish_platform.config import S3Location

    location = S3Location.parse(f"s3://{settings.state_location.bucket}/env/prod")
    store = StateStore(s3, location)
    key = store.write_snapshot(SOURCE, 1, SNAPSHOT, "p1")
    store.advance_pointer(pointer(1, snapshot_key=key), expected_serial=0)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=location.bucket)["Contents"]]
    assert len(keys) == 3  # snapshot, pointer, history entry
    assert all(k.startswith("env/prod/sources/") for k in keys)
    assert store.list_sources() == [SOURCE]
    assert store.read_snapshot(SOURCE, 1).equals(SNAPSHOT)
    with pytest.raises(ValueError):
        S3Location.parse("s3://bucket/../other")


def test_a_history_entry_lost_to_a_crash_is_written_by_the_next_commit(store, monkeypatch):
    store.advance_pointer(pointer(1), expected_serial=0)
    real = StateStore._record_history
    calls: list[int] = []

    def crash_after_commit(self, entry):
        calls.append(entry.serial)
        if entry.serial == 2:
            raise ConnectionError("killed right after the pointer moved")
        real(self, entry)

    monkeypatch.setattr(StateStore, "_record_history", crash_after_commit)
    with pytest.raises(ConnectionError):
        store.advance_pointer(pointer(2), expected_serial=1)
    monkeypatch.undo()
    assert calls == [1, 2] and store.current_serial(SOURCE) == 2
    assert store.get_bytes(store.history_key(SOURCE, 2)) is None
    assert [p.serial for p in store.history(SOURCE)] == [1, 2]  # the pointer stands in

    store.advance_pointer(pointer(3), expected_serial=2)
    assert store.get_bytes(store.history_key(SOURCE, 2)) is not None
    assert [p.serial for p in store.history(SOURCE)] == [1, 2, 3]


@pytest.mark.parametrize("serial", [1, 2])
def test_a_pointer_write_whose_answer_was_lost_commits_once(s3_faults, settings, serial):
    """S3 applied the conditional write but the answer was lost; boto3 retries it and S3 refuses
    the retry (412): that refusal is our own write, not another publisher's."""
    from publish_platform.local_s3 import s3_client

    store = StateStore(s3_client(s3_faults.url), settings.state_location)
    if serial == 2:
        store.advance_pointer(pointer(1), expected_serial=0)
    lost = s3_faults.add(r"/pointer\.json$", "lost", "PUT")
    store.advance_pointer(pointer(serial), expected_serial=serial - 1)

    assert lost.hits == 1
    assert [r.outcome for r in s3_faults.seen(r"/pointer\.json$", "PUT")][-2:] == [
        "lost 200",
        "forward 412",
    ]
    assert store.current_serial(SOURCE) == serial
    assert [p.serial for p in store.history(SOURCE)] == list(range(1, serial + 1))
    with pytest.raises(StaleStateError, match="moved during publish|plan expected"):
        store.advance_pointer(pointer(serial), expected_serial=serial - 1)


def test_frames_are_stored_in_bounded_row_groups_and_read_as_one_chunk(store):
    """Encoded a row group at a time (polars' default group of up to 512k rows is encoded whole:
    a copy of the batch's changed JSON), and read back as one chunk (joins of a frame of many
    chunks copy its strings)."""
    frame = pl.DataFrame({"n": range(ROW_GROUP_ROWS * 2 + 1), "entity": "{}"})
    key = store.batch_key("app/wf/run-1", "diff.parquet")
    store.put_frame(key, frame)
    stored = store.get_bytes(key)
    assert stored is not None
    assert pq.ParquetFile(io.BytesIO(stored[0])).metadata.num_row_groups == 3
    read = store.get_frame(key)
    assert read.equals(frame) and read.n_chunks() == 1
