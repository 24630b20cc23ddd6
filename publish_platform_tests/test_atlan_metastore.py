"""The Atlan metastore: pyatlan's real client over HTTP against the local Atlas-compatible server.

What is counted here is what Atlan would see: requests per chunk, look-ups, throttling answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from publish_platform.config import Settings
from publish_platform.diff import diff_batch
from publish_platform.entities import parse_files
from publish_platform.local_atlas import Fault, LocalAtlas
from publish_platform.metastores import open_metastore
from publish_platform.metastores.base import (
    EntityWrite,
    Identity,
    MetastoreRefusedError,
    ThrottledError,
    TransientMetastoreError,
)
from publish_platform.plan import build_plan
from publish_platform.publish import execute_plan
from publish_platform.state import empty_snapshot

from .support import SOURCE, VOLATILE, entity, identity, jsonl, small_source

MUTATIONS = {("POST", "/api/meta/entity/bulk/"), ("DELETE", "/api/meta/entity/bulk/")}


def writes_of(entities: list[dict], guids: dict | None = None) -> list[EntityWrite]:
    return [EntityWrite.of(e, "hash", (guids or {}).get(identity(e))) for e in entities]


def calls(atlas: LocalAtlas) -> list[tuple[str, str, int]]:
    return [(r.method, r.path, r.status) for r in atlas.store.requests()]


@pytest.fixture
def metastore(atlan_settings: Settings):
    metastore = open_metastore(atlan_settings)
    yield metastore
    metastore.close()


def test_upsert_is_one_request_per_chunk_and_returns_assigned_guids(atlas, metastore):
    entities = small_source()
    results = metastore.upsert(writes_of(entities))

    assert [r.ok for r in results] == [True] * 8
    stored = {identity(e): e["guid"] for e in atlas.store.dump()}
    assert {(r.type_name, r.qualified_name): r.guid for r in results} == stored
    assert calls(atlas) == [("POST", "/api/meta/entity/bulk/", 200)]
    # References landed as relationships: each column points at its table's guid.
    column = next(e for e in atlas.store.dump() if e["typeName"] == "Column")
    table_qn = column["attributes"]["table"]["uniqueAttributes"]["qualifiedName"]
    assert column["attributes"]["table"]["guid"] == stored[("Table", table_qn)]


def test_guids_unknown_to_the_snapshot_come_from_the_answer_without_look_ups(atlas, metastore):
    entities = small_source()
    first = {(r.type_name, r.qualified_name): r.guid for r in metastore.upsert(writes_of(entities))}
    atlas.store.clear_requests()

    # Same content, no guids (a snapshot that lacks them): Atlan answers with guidAssignments.
    again = metastore.upsert(writes_of(entities))

    assert {(r.type_name, r.qualified_name): r.guid for r in again} == first
    assert calls(atlas) == [("POST", "/api/meta/entity/bulk/", 200)]
    assert set(atlas.store.versions().values()) == {1}  # nothing changed, nothing rewritten


def test_archive_by_default_purge_when_asked_and_already_gone_succeeds(atlas, metastore):
    entities = small_source()
    guids = {(r.type_name, r.qualified_name): r.guid for r in metastore.upsert(writes_of(entities))}
    columns = [
        Identity(*identity(e), guids[identity(e)]) for e in entities if "/t2/" in identity(e)[1]
    ]
    atlas.store.clear_requests()

    assert all(r.ok for r in metastore.delete(columns))
    assert calls(atlas) == [("DELETE", "/api/meta/entity/bulk/", 200)]  # guids known: no look-up
    archived = {identity(e): e["status"] for e in atlas.store.dump(include_archived=True)}
    assert [archived[(c.type_name, c.qualified_name)] for c in columns] == ["DELETED"] * 2

    # Purged, including one already archived and given without guid (looked up in one search).
    purge = [Identity("Table", f"{SOURCE}/db/s/t2"), *columns]
    atlas.store.clear_requests()
    assert all(r.ok for r in metastore.delete(purge, purge=True))
    assert [c[0:2] for c in calls(atlas)] == [
        ("POST", "/api/meta/search/indexsearch"),
        ("DELETE", "/api/meta/entity/bulk/"),
    ]
    left = {identity(e) for e in atlas.store.dump(include_archived=True)}
    assert not left & {(p.type_name, p.qualified_name) for p in purge}

    # Deleting what is gone (deleted outside the platform) succeeds and loses nothing else.
    assert all(r.ok for r in metastore.delete(columns))
    assert len(atlas.store.dump()) == 5


def test_existing_looks_up_identities_in_batches(atlas, metastore):
    entities = small_source()
    metastore.upsert(writes_of(entities))
    atlas.store.clear_requests()
    asked = [identity(e) for e in entities] + [("Table", "default/test/1/db/s/missing")]

    assert metastore.existing(asked) == {identity(e) for e in entities}
    assert calls(atlas) == [("POST", "/api/meta/search/indexsearch", 200)]


def test_a_rejected_entity_is_isolated_and_the_rest_of_its_chunk_published(atlas, metastore):
    entities = small_source()
    entities[3]["attributes"]["columnCount"] = "many"  # Atlas refuses a non-integer for a long
    parsed = parse_files([("entities.json", jsonl(entities))], VOLATILE)
    plan = build_plan(diff_batch(parsed, empty_snapshot(), SOURCE, "full"), "app/wf/run", 0)
    outcome = execute_plan(plan.operations, metastore, chunk_size=50)

    assert outcome.failed == 1 and outcome.succeeded == 7
    assert "invalid value 'many' for attribute columnCount" in outcome.errors[0]["error"]
    assert outcome.errors[0]["qualified_name"] == identity(entities[3])[1]
    assert len(atlas.store.dump()) == 7


def test_server_errors_are_transient_and_a_persistent_503_does_not_split(atlas, metastore):
    # pyatlan answers a 503 with None instead of raising: it must still fail as transient.
    atlas.store.add_fault(Fault(503, count=1))
    with pytest.raises(TransientMetastoreError, match="503"):
        metastore.upsert(writes_of(small_source()))
    atlas.store.add_fault(Fault(500, count=1))
    with pytest.raises(TransientMetastoreError, match="500"):
        metastore.existing([("Table", "x")])
    assert atlas.store.dump() == []


def test_a_refused_api_key_fails_the_step_without_splitting(atlas, atlan_settings, monkeypatch):
    monkeypatch.setenv("ATLAN_API_KEY", "not-the-key")
    metastore = open_metastore(atlan_settings)
    try:
        with pytest.raises(MetastoreRefusedError, match="401"):
            metastore.upsert(writes_of(small_source()))
    finally:
        metastore.close()
    assert len(atlas.store.requests()) == 1


def test_a_429_pauses_for_retry_after_then_succeeds_in_the_step(atlas, metastore):
    atlas.store.add_fault(Fault(429, count=2, retry_after=0.4))
    started = time.monotonic()
    results = metastore.upsert(writes_of(small_source()))

    assert all(r.ok for r in results)
    assert time.monotonic() - started >= 0.8
    log = atlas.store.requests()
    assert [r.status for r in log] == [429, 429, 200]
    assert log[1].at - log[0].at >= 0.4 and log[2].at - log[1].at >= 0.4


def test_a_cool_down_longer_than_a_step_waits_goes_to_tier_2(atlas, atlan_settings):
    settings = atlan_settings.model_copy(update={"atlan_max_inline_wait_seconds": 1.0})
    metastore = open_metastore(settings)
    atlas.store.add_fault(Fault(429, count=1, retry_after=30))
    try:
        with pytest.raises(ThrottledError) as raised:
            metastore.upsert(writes_of(small_source()))
    finally:
        metastore.close()
    assert raised.value.retry_after >= 29
    assert len(atlas.store.requests()) == 1


def test_pyatlan_is_imported_only_when_atlan_is_the_metastore(tmp_path: Path):
    script = f"""
import sys
import publish_platform.defs, publish_platform.cli
from publish_platform.config import Settings
from publish_platform.metastores import open_metastore
open_metastore(Settings(metastore="sqlite:///{tmp_path / "c.sqlite"}")).close()
assert "pyatlan" not in sys.modules, "pyatlan imported on the SQL path"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_entities_keep_every_attribute_as_the_connector_wrote_it(atlas, metastore):
    custom = entity("Table", "db/s/t9", someAttributeNoModelKnows={"nested": [1, 2]})
    metastore.upsert(writes_of([entity("Database", "db"), entity("Schema", "db/s"), custom]))
    stored = next(e for e in atlas.store.dump() if e["typeName"] == "Table")
    assert stored["attributes"]["someAttributeNoModelKnows"] == {"nested": [1, 2]}
