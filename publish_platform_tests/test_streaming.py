"""The diff step streams a batch's data files from S3 (moto server): each file is read once, in
pieces, parsed and hashed on the way, and verified after the parse; a batch that fails
verification is quarantined and nothing of it is published."""

from __future__ import annotations

import re
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError

from publish_platform import entities, landing
from publish_platform.landing import RunRef, read_batch
from publish_platform.local_s3 import s3_client
from publish_platform.pipeline import read_diff, run_diff, run_plan, run_publish

from .support import (
    SOURCE,
    entity,
    jsonl,
    land,
    land_batch,
    manifest_for,
    run_batch,
    sha256,
    small_source,
)

DATA = "transformed/entities/entities.json"
BASELINE = RunRef("test", "wf", "baseline")
RUN = RunRef("test", "wf", "streamed")
PIECE = 64 * 1024


class RecordingS3:
    """The S3 client, recording how each data file's body is read: the size of every piece
    (None: the body read whole), by key."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3
        self.reads: dict[str, list[int | None]] = {}
        self.gets: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def get_object(self, **params: Any) -> dict[str, Any]:
        answer = self._s3.get_object(**params)
        key = params["Key"]
        if "/transformed/" in key and key.endswith(".json"):
            self.gets.append(key)
            sizes = self.reads.setdefault(key, [])
            body, read = answer["Body"], answer["Body"].read

            def recorded(amt: int | None = None) -> bytes:
                piece = read(amt)
                sizes.append(None if amt is None else len(piece))
                return piece

            body.read = recorded  # what iter_chunks calls, piece by piece
        return answer


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 64 KiB cut into blocks of 256 KiB: a multi-MB file takes many of each."""
    monkeypatch.setattr(landing, "PIECE_BYTES", PIECE)
    monkeypatch.setattr(entities, "BLOCK_BYTES", 256 * 1024)


def big_source(columns: int = 6000) -> list[dict]:
    """The small source plus many wordy columns: about 4 MB of JSON lines."""
    wordy = [
        entity("Column", f"db/s/t1/w{n}", description=f"column {n} " + "lorem ipsum " * 30)
        for n in range(columns)
    ]
    return [*small_source(), *wordy]


def land_streamed(s3: Any, settings: Any, data: bytes, **files_entry: Any) -> None:
    """The run folder RUN: one data file with a sidecar, and a manifest listing it with its
    record count and sha256 (``files_entry`` overrides them; a ``sidecar`` key its sidecar)."""
    sidecar = files_entry.pop("sidecar", sha256(data))
    entry = {"path": DATA, "records": data.count(b"\n"), "sha256": sha256(data), **files_entry}
    land(
        s3,
        settings.landing_location,
        RUN,
        {DATA: data, DATA + ".sha256": sidecar.encode()},
        manifest_for(RUN, SOURCE, source_timestamp="2026-01-02T00:00:00Z", files=[entry]),
    )


def test_a_multi_megabyte_file_is_streamed_once_in_pieces_and_diffed(
    s3, state, settings, small_pieces
):
    source = big_source()
    data = jsonl(source)
    assert len(data) > 4 * 2**20
    land_streamed(s3, settings, data)
    recording = RecordingS3(s3)

    diff = run_diff(recording, state, settings, RUN.partition_key)

    assert diff.outcome == "diffed" and diff.problems == []
    assert diff.lines == diff.valid_entities == diff.creates == len(source)
    key = RUN.prefix(settings.landing_location) + DATA
    assert recording.gets == [key]  # read once: parsed, hashed and counted on the same read
    pieces = recording.reads[key]
    assert None not in pieces  # never read whole
    assert len(pieces) > len(data) // PIECE and max(pieces) <= PIECE
    assert sum(p for p in pieces if p) == len(data)
    stored, changes = read_diff(state, RUN.partition_key)
    assert stored.creates == len(source) and changes.height == len(source)


@pytest.mark.parametrize(
    ("mismatch", "kind", "message"),
    [
        ("sidecar", "checksum_mismatch", "{DATA}: sha256 {actual} but sidecar says {wrong}"),
        ("sha256", "checksum_mismatch", "{DATA}: sha256 {actual} but manifest says {wrong}"),
        ("records", "count_mismatch", "{DATA}: {lines} records but manifest says {records}"),
    ],
    ids=["sidecar-sha256", "manifest-sha256", "manifest-records"],
)
def test_a_mismatch_found_only_after_streaming_quarantines_and_publishes_nothing(
    s3, state, settings, catalog, small_pieces, mismatch, kind, message
):
    land_batch(s3, settings, BASELINE, small_source(), source_timestamp="2026-01-01T00:00:00Z")
    run_batch(s3, state, settings, catalog, BASELINE)
    versions = catalog.versions()
    source = big_source()
    data = jsonl(source)
    wrong = sha256(data + b"tampered")
    land_streamed(
        s3, settings, data, **{mismatch: len(source) + 1 if mismatch == "records" else wrong}
    )
    assert read_batch(s3, settings.landing_location, RUN).publishable  # unknown before the read
    recording = RecordingS3(s3)

    diff = run_diff(recording, state, settings, RUN.partition_key)

    assert recording.gets == [RUN.prefix(settings.landing_location) + DATA]  # streamed whole
    assert diff.outcome == "quarantined"
    expected = message.format(
        DATA=DATA, actual=sha256(data), wrong=wrong, lines=len(source), records=len(source) + 1
    )
    assert diff.problems == [{"kind": kind, "message": expected}]
    assert (diff.lines, diff.creates) == (0, 0)  # what was parsed is discarded
    assert read_diff(state, RUN.partition_key)[1].height == 0
    _, plan, _ = run_plan(state, settings, RUN.partition_key)
    assert plan.operations.collect().height == 0
    assert run_publish(state, settings, catalog, RUN.partition_key).outcome == "not_publishable"
    assert catalog.versions() == versions
    assert state.current_serial(SOURCE) == 1


@pytest.mark.parametrize(
    ("files", "manifest", "outcome"),
    [
        ({DATA: jsonl(small_source())}, {"status": "FAILED"}, "skipped"),
        ({DATA: jsonl(small_source())}, {"mode": "sometimes"}, "quarantined"),
        (
            {DATA: jsonl(small_source())},
            {"files": [{"path": "transformed/other/entities.json", "records": 1}]},
            "quarantined",
        ),
        (
            {DATA: jsonl(small_source()), "transformed/../x.json": jsonl(small_source())},
            {},
            "quarantined",
        ),
    ],
    ids=["failed-run", "bad-manifest", "missing-file", "unsafe-key"],
)
def test_problems_known_without_the_data_never_read_it(
    s3, state, settings, files, manifest, outcome
):
    land(s3, settings.landing_location, RUN, files, manifest_for(RUN, SOURCE, **manifest))
    recording = RecordingS3(s3)

    diff = run_diff(recording, state, settings, RUN.partition_key)

    assert diff.outcome == outcome
    assert recording.gets == []


def test_a_connection_broken_mid_body_fails_the_step_and_its_retry_reads_again(
    s3, s3_faults, state, settings, small_pieces
):
    """As read_object did: the error is raised (the step fails, tier 2 retries it), and nothing
    of the failed attempt is stored."""
    source = big_source()
    data = jsonl(source)
    land_streamed(s3, settings, data)
    key = RUN.prefix(settings.landing_location) + DATA
    object_path = re.escape(f"/{settings.landing_location.bucket}/{key}")
    cut = s3_faults.add(rf"^{object_path}(\?|$)", "cut", "GET")
    through_proxy = s3_client(s3_faults.url)

    with pytest.raises(BotoCoreError):
        run_diff(through_proxy, state, settings, RUN.partition_key)

    assert cut.hits == 1
    assert state.get_bytes(state.batch_key(RUN.partition_key, "diff.json")) is None
    retried = run_diff(through_proxy, state, settings, RUN.partition_key)
    assert retried.outcome == "diffed" and retried.valid_entities == len(source)
