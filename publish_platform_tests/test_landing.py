"""Landing: discovery, readiness, manifests and verification of run folders, over a real S3 API."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from publish_platform.landing import (
    InvalidRunFolder,
    LandedBatch,
    RunRef,
    assess_readiness,
    discover,
    is_data_file,
    list_run,
    parse_batch,
    read_batch,
    unsafe_path,
)
from publish_platform.state import StateStore

from .support import (
    UPSTREAM_ENTITIES,
    UPSTREAM_REF,
    UPSTREAM_SOURCE,
    entity,
    jsonl,
    land,
    manifest_for,
    sha256,
    small_source,
    upstream_data,
    upstream_files,
    with_sidecars,
)

SDK3_DATA = [
    "transformed/column/entities.json",
    "transformed/database/entities.json",
    "transformed/extras-procedure/entities.json",
    "transformed/schema/entities.json",
    "transformed/table/entities.json",
]


def kinds(batch) -> list[str]:
    return sorted(p.kind for p in batch.problems)


def verified(s3, landing, run) -> LandedBatch:
    """The batch as the diff step sees it: read_batch's problems or, if it found none, those
    found on streaming and parsing its data (checksums, record counts)."""
    batch = read_batch(s3, landing, run)
    if batch.publishable:
        batch.problems.extend(parse_batch(s3, batch, ())[1])
    return batch


# --- layouts ---------------------------------------------------------------------------------


def test_sdk3_layout_with_real_sidecars_reads_only_transformed_json(s3, settings):
    landing = settings.landing_location
    files = {
        **upstream_files(),
        "raw/table/chunk-0.json": b'{"not": "published"}\n',
        "raw/column/result-0.parquet": b"PAR1",
        "transformed/table/entities.parquet": b"PAR1",
        "transformed/table/notes.txt": b"hello",
    }
    assert sum(k.endswith(".sha256") for k in files) == 5  # the SDK's own sidecars
    land(s3, landing, UPSTREAM_REF, files)

    batch = read_batch(s3, landing, UPSTREAM_REF)

    assert batch.problems == []
    assert batch.publishable
    assert batch.manifest is None
    assert [f.relative_key for f in batch.files] == SDK3_DATA
    assert [f.sidecar_sha256 for f in batch.files] == [sha256(files[k]) for k in SDK3_DATA]
    assert [f.size for f in batch.files] == [len(files[k]) for k in SDK3_DATA]
    parsed, problems = parse_batch(s3, batch, ())
    assert problems == []  # every sidecar matches the data as streamed
    assert parsed.issues == []
    assert parsed.frame.height == UPSTREAM_ENTITIES
    assert set(parsed.frame["connection_qualified_name"]) == {UPSTREAM_SOURCE}


def test_sdk2_layout_chunks_are_data_and_statistics_are_ignored(s3, settings):
    landing = settings.landing_location
    run = RunRef("postgres", "wf-v2", "run-v2")
    entities = small_source()
    tables = [e for e in entities if e["typeName"] == "Table"]
    columns = [e for e in entities if e["typeName"] == "Column"]
    others = [e for e in entities if e["typeName"] not in ("Table", "Column")]
    files = {
        "transformed/Table/chunk-0-part1.json": jsonl(tables[:1]),
        "transformed/Table/chunk-1-part1.json": jsonl(tables[1:]),
        "transformed/Table/statistics/chunk-0-part1.json.ignore": b'{"records":1}',
        "transformed/Table/statistics/chunk-1-part1.json": b'{"records":1}',
        "transformed/Column/chunk-0-part1.json": jsonl(columns),
        "transformed/Column/statistics/chunk-0-part1.json.ignore": b'{"records":4}',
        "transformed/Other/chunk-0-part1.json": jsonl(others),
        "raw/Table/chunk-0-part1.json": b'{"raw": true}\n',
    }
    land(s3, landing, run, files)

    batch = read_batch(s3, landing, run)

    assert batch.problems == []
    assert [f.relative_key for f in batch.files] == [
        "transformed/Column/chunk-0-part1.json",
        "transformed/Other/chunk-0-part1.json",
        "transformed/Table/chunk-0-part1.json",
        "transformed/Table/chunk-1-part1.json",
    ]
    parsed, problems = parse_batch(s3, batch, ())
    assert problems == []
    assert parsed.issues == []
    assert parsed.frame.height == len(entities)


@pytest.mark.parametrize(
    ("relative_key", "is_data"),
    [
        ("transformed/table/entities.json", True),
        ("transformed/Table/chunk-3-part2.json", True),
        ("transformed/Table/statistics/chunk-0-part1.json.ignore", False),
        ("transformed/Table/statistics/summary.json", False),
        ("transformed/table/entities.json.sha256", False),
        ("transformed/table/entities.parquet", False),
        ("raw/table/entities.json", False),
        ("publish-request.json", False),
    ],
)
def test_only_transformed_json_is_data(relative_key, is_data):
    assert is_data_file(relative_key) is is_data


# --- readiness -------------------------------------------------------------------------------


def test_manifest_makes_a_run_ready_at_once(s3, settings):
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_files(), manifest=manifest_for(UPSTREAM_REF))
    listing = list_run(s3, landing, UPSTREAM_REF)
    assert listing.manifest is not None
    # Written a moment ago and a settle period of an hour: the manifest is what counts.
    readiness = assess_readiness(listing, listing.last_modified, settle_seconds=3600)
    assert readiness.ready
    assert "manifest" in readiness.reason


def test_without_manifest_ready_only_after_settle_period(s3, settings):
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_files())
    listing = list_run(s3, landing, UPSTREAM_REF)
    last = listing.last_modified
    assert listing.manifest is None

    early = assess_readiness(listing, last + timedelta(seconds=10), settle_seconds=60)
    assert not early.ready
    assert "settling" in early.reason
    late = assess_readiness(listing, last + timedelta(seconds=61), settle_seconds=60)
    assert late.ready


def test_without_manifest_every_data_file_needs_its_sidecar_once_any_has_one(s3, settings):
    landing = settings.landing_location
    files = upstream_files()
    del files["transformed/table/entities.json.sha256"]  # the SDK has not uploaded it yet
    land(s3, landing, UPSTREAM_REF, files)
    listing = list_run(s3, landing, UPSTREAM_REF)
    later = listing.last_modified + timedelta(hours=1)

    waiting = assess_readiness(listing, later, settle_seconds=0)
    assert not waiting.ready
    assert "1 data file(s) still without their .sha256" in waiting.reason

    sidecar = upstream_files()["transformed/table/entities.json.sha256"]
    land(s3, landing, UPSTREAM_REF, {"transformed/table/entities.json.sha256": sidecar})
    listing = list_run(s3, landing, UPSTREAM_REF)
    assert assess_readiness(listing, listing.last_modified + timedelta(hours=1), 0).ready


def test_without_any_sidecar_settle_period_alone_decides(s3, settings):
    landing = settings.landing_location
    land(s3, landing, UPSTREAM_REF, upstream_data())
    listing = list_run(s3, landing, UPSTREAM_REF)
    assert listing.sidecars == {}
    assert assess_readiness(listing, listing.last_modified + timedelta(seconds=1), 0).ready


# --- verification problems -------------------------------------------------------------------


def test_sidecar_mismatch_makes_the_whole_batch_unpublishable(s3, settings):
    landing = settings.landing_location
    files = upstream_files()
    files["transformed/schema/entities.json.sha256"] = b"0" * 64 + b"  entities.json\n"
    land(s3, landing, UPSTREAM_REF, files)

    assert read_batch(s3, landing, UPSTREAM_REF).publishable  # not known before the data is read
    batch = verified(s3, landing, UPSTREAM_REF)

    assert kinds(batch) == ["checksum_mismatch"]
    assert not batch.publishable
    data = files["transformed/schema/entities.json"]
    assert batch.problems[0].message == (
        f"transformed/schema/entities.json: sha256 {sha256(data)} but sidecar says {'0' * 64}"
    )


def test_tampered_data_file_is_caught_by_its_real_sidecar(s3, settings):
    landing = settings.landing_location
    files = upstream_files()
    files["transformed/database/entities.json"] += b'{"typeName":"Database"}\n'
    land(s3, landing, UPSTREAM_REF, files)
    assert kinds(verified(s3, landing, UPSTREAM_REF)) == ["checksum_mismatch"]


def test_manifest_with_matching_files_counts_and_checksums_is_accepted(s3, settings):
    landing = settings.landing_location
    data = upstream_data()
    manifest = manifest_for(
        UPSTREAM_REF,
        mode="incremental",
        files=[
            {"path": key, "records": len(value.splitlines()), "sha256": sha256(value)}
            for key, value in data.items()
        ],
        priority={"importance": 80},
    )
    land(s3, landing, UPSTREAM_REF, data, manifest=manifest)

    batch = verified(s3, landing, UPSTREAM_REF)

    assert batch.problems == []
    assert batch.manifest is not None
    assert batch.manifest.mode == "incremental"
    assert batch.manifest.connection_qualified_name == UPSTREAM_SOURCE


@pytest.mark.parametrize(
    "manifest",
    [
        b"{not json",
        b"[]",
        {"workflow_id": "pg-local-extract"},  # required fields missing
        {"unexpected_field": 1},  # extra fields are refused
        {"status": "MAYBE"},
        {"mode": "partial"},
        {"connection_qualified_name": ""},
        {"run_id": "some-other-run"},  # manifest of another run folder
        {"files": [{"path": "transformed/table/entities.json", "sha256": "xyz"}]},
    ],
    ids=[
        "not-json",
        "not-object",
        "missing-fields",
        "extra-field",
        "bad-status",
        "bad-mode",
        "empty-source",
        "other-run",
        "bad-sha",
    ],
)
def test_invalid_manifest_is_rejected(s3, settings, manifest):
    landing = settings.landing_location
    if isinstance(manifest, dict):
        if set(manifest) == {"workflow_id"}:
            body = manifest
        else:
            body = manifest_for(UPSTREAM_REF, **manifest)
    else:
        body = manifest
    land(s3, landing, UPSTREAM_REF, upstream_files(), manifest=body)

    batch = read_batch(s3, landing, UPSTREAM_REF)

    assert "rejected_manifest" in kinds(batch)
    assert not batch.publishable


@pytest.mark.parametrize("status", ["FAILED", "CANCELLED", "TERMINATED", "TIMED_OUT"])
def test_unsuccessful_workflow_run_is_skipped(s3, settings, status):
    landing = settings.landing_location
    # A failed run often has no transformed data at all: that is "skipped", not "no_data".
    land(s3, landing, UPSTREAM_REF, {}, manifest=manifest_for(UPSTREAM_REF, status=status))
    batch = read_batch(s3, landing, UPSTREAM_REF)
    assert kinds(batch) == ["skipped"]
    assert status in batch.problems[0].message


def test_manifest_files_missing_or_unlisted_are_found_without_reading_data(s3, settings):
    landing = settings.landing_location
    data = upstream_data()
    listed = [{"path": key, "records": len(value.splitlines())} for key, value in data.items()]
    listed.append({"path": "transformed/view/entities.json", "records": 1})  # never landed
    unlisted = listed.pop(1)["path"]  # database file landed but not listed
    land(s3, landing, UPSTREAM_REF, data, manifest=manifest_for(UPSTREAM_REF, files=listed))

    batch = read_batch(s3, landing, UPSTREAM_REF)

    assert kinds(batch) == ["count_mismatch"] * 2
    assert [p.message for p in batch.problems] == [
        "manifest lists missing transformed/view/entities.json",
        f"data files not in the manifest: {unlisted}",
    ]


def test_manifest_counts_that_do_not_match_the_data(s3, settings):
    landing = settings.landing_location
    data = upstream_data()
    listed = [{"path": key, "records": len(value.splitlines())} for key, value in data.items()]
    listed[0]["records"] += 1  # column: 25 lines, manifest says 26
    land(s3, landing, UPSTREAM_REF, data, manifest=manifest_for(UPSTREAM_REF, files=listed))

    batch = verified(s3, landing, UPSTREAM_REF)

    assert kinds(batch) == ["count_mismatch"]
    assert batch.problems[0].message == (
        "transformed/column/entities.json: 25 records but manifest says 26"
    )


def test_manifest_checksum_mismatch(s3, settings):
    landing = settings.landing_location
    data = upstream_data()
    listed = [{"path": key, "sha256": sha256(value)} for key, value in data.items()]
    listed[2]["sha256"] = "f" * 64
    land(s3, landing, UPSTREAM_REF, data, manifest=manifest_for(UPSTREAM_REF, files=listed))
    batch = verified(s3, landing, UPSTREAM_REF)
    assert kinds(batch) == ["checksum_mismatch"]
    path = listed[2]["path"]
    assert batch.problems[0].message == (
        f"{path}: sha256 {sha256(data[path])} but manifest says {'f' * 64}"
    )


def test_run_folder_without_transformed_data_is_no_data(s3, settings):
    landing = settings.landing_location
    files = {
        "raw/table/chunk-0.json": b'{"table_name": "t"}\n',
        "transformed/table/statistics/chunk-0-part1.json.ignore": b"{}",
        "transformed/table/entities.parquet": b"PAR1",
    }
    land(s3, landing, UPSTREAM_REF, files)
    batch = read_batch(s3, landing, UPSTREAM_REF)
    assert kinds(batch) == ["no_data"]
    assert batch.files == []


# --- partition keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "postgres/../11111111",
        "postgres/wf/..",
        "../wf/run",
        "postgres/wf/.hidden",
        "postgres//run",
        "postgres/wf",
        "postgres/wf/run/extra",
        "postgres/wf/run id",
        "postgres/wf/run\\x",
        "",
    ],
)
def test_unsafe_partition_keys_are_refused(key, s3, settings):
    with pytest.raises(InvalidRunFolder):
        RunRef.from_partition_key(key)
    # ... and the state store never builds a key from one.
    with pytest.raises(InvalidRunFolder):
        StateStore(s3, settings.state_location).batch_key(key, "plan.json")


def test_partition_key_round_trip():
    run = RunRef.from_partition_key(UPSTREAM_REF.partition_key)
    assert run == UPSTREAM_REF
    assert run.prefix_in_landing() == (
        "artifacts/apps/postgres/workflows/pg-local-extract/11111111-1111-4111-8111-111111111111/"
    )


# --- discovery -------------------------------------------------------------------------------


def test_discover_returns_unknown_ready_runs_oldest_first(s3, settings):
    landing = settings.landing_location
    older = RunRef("postgres", "wf-b", "run-z")
    newer = RunRef("postgres", "wf-a", "run-a")  # sorts first by name, landed later
    known = RunRef("mysql", "wf-k", "run-known")
    settling = RunRef("postgres", "wf-c", "run-settling")
    data = {"transformed/table/entities.json": jsonl(small_source())}

    land(s3, landing, older, data)
    land(s3, landing, known, data)
    time.sleep(1.1)  # S3 LastModified has a resolution of one second
    land(s3, landing, newer, data)
    # Sidecar of one file present, of another missing: still being written.
    land(
        s3,
        landing,
        settling,
        {
            **with_sidecars(
                {"transformed/table/entities.json": data["transformed/table/entities.json"]}
            ),
            "transformed/column/entities.json": jsonl([entity("Column", "db/s/t1/c9")]),
        },
    )
    s3.put_object(
        Bucket=landing.bucket,
        Key=landing.key(
            "artifacts/apps/postgres/workflows/wf-x/bad run/transformed/t/entities.json"
        ),
        Body=b"{}",
    )
    newest = max(list_run(s3, landing, r).last_modified for r in (older, newer, known, settling))

    found = discover(
        s3,
        landing,
        known={known.partition_key},
        settle_seconds=60,
        now=newest + timedelta(seconds=120),
    )

    assert [listing.run for listing in found.ready] == [older, newer]
    assert list(found.waiting) == [settling.partition_key]
    assert "without their .sha256" in found.waiting[settling.partition_key]
    assert len(found.rejected) == 1 and "bad run" in found.rejected[0]
    assert found.deep_listings == 3  # the known run folder was never listed in depth

    # A moment after landing nothing is ready yet: everything is still settling.
    quiet = discover(s3, landing, known=set(), settle_seconds=60, now=newest)
    assert quiet.ready == []
    assert set(quiet.waiting) == {r.partition_key for r in (older, newer, known, settling)}


def test_discover_respects_landing_prefix(s3, settings):
    from publish_platform.config import S3Location

    prefix = S3Location(bucket=settings.landing_location.bucket, prefix="team-a/landing/")
    land(s3, prefix, UPSTREAM_REF, upstream_files())
    land(s3, settings.landing_location, RunRef("other", "wf", "run"), upstream_data())
    found = discover(s3, prefix, known=set(), settle_seconds=0)
    assert [listing.run for listing in found.ready] == [UPSTREAM_REF]
    assert read_batch(s3, prefix, UPSTREAM_REF).publishable


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("transformed/table/entities.json", None),
        ("transformed/t/chunk-0-part1.json.sha256", None),
        ("transformed/", None),  # folder markers, as S3 consoles create them
        ("", None),
        ("/etc/passwd", "absolute path"),
        ("transformed/../x.json", "path segment '..'"),
        ("transformed/./x.json", "path segment '.'"),
        ("transformed//x.json", "empty path segment"),
        ("..", "path segment '..'"),
    ],
)
def test_unsafe_paths_in_a_run_folder(path, problem):
    assert unsafe_path(path) == problem


def test_a_key_with_dotdot_or_an_unsafe_manifest_path_quarantines_the_batch(s3, settings):
    """The key would be data as listed (transformed/…/*.json) but lies outside transformed/
    once resolved: nothing of such a batch is read as data."""
    landing = settings.landing_location
    files = {**upstream_files(), "transformed/../evil.json": jsonl([entity("Table", "db/s/x")])}
    land(s3, landing, UPSTREAM_REF, files)
    batch = read_batch(s3, landing, UPSTREAM_REF)
    assert kinds(batch) == ["unsafe_key"]
    assert "'transformed/../evil.json': path segment '..'" in batch.problems[0].message

    listed = [{"path": "/abs/entities.json", "records": 1}]
    land(s3, landing, UPSTREAM_REF, {}, manifest=manifest_for(UPSTREAM_REF, files=listed))
    batch = read_batch(s3, landing, UPSTREAM_REF)
    assert "rejected_manifest" in kinds(batch)
    assert "must be a relative path inside the run folder (absolute path)" in " ".join(
        p.message for p in batch.problems
    )
