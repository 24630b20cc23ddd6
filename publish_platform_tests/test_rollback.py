"""Rollback: an older snapshot republished through the plan checks and the publish path."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from publish_platform.config import DEFAULT_VOLATILE_ATTRIBUTES, Settings
from publish_platform.demo import changed_run
from publish_platform.local_s3 import upload_tree
from publish_platform.metastores.sql import SqlCatalog
from publish_platform.state import StateStore
from publish_platform_tests.commands import run_cli
from publish_platform_tests.support import UPSTREAM_RUN, UPSTREAM_SOURCE, upstream_entities


def _content(entities: list[dict]) -> dict[tuple[str, str], dict]:
    """Entities by identity, without guid and volatile attributes."""
    return {
        (e["typeName"], e["attributes"]["qualifiedName"]): {
            **{k: v for k, v in e.items() if k != "guid"},
            "attributes": {
                k: v for k, v in e["attributes"].items() if k not in DEFAULT_VOLATILE_ATTRIBUTES
            },
        }
        for e in entities
    }


@pytest.fixture
def two_serials(settings: Settings, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The fixture run published as serial 1, a changed run of its source as serial 2."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    run_cli("land", str(UPSTREAM_RUN))
    run_cli("drain")
    second = changed_run(tmp_path / "second")
    upload_tree(s3, second.root, settings.landing_location.bucket, settings.landing_location.prefix)
    run_cli("drain")
    state = StateStore(s3, settings.state_location)
    assert state.current_serial(UPSTREAM_SOURCE) == 2
    return state, second


def _dump(source: str) -> list[dict]:
    return [
        orjson.loads(line)
        for line in run_cli("catalog", "dump", "--source", source).stdout.splitlines()
    ]


def test_rollback_is_held_by_the_deletion_check_until_approved_then_restores_the_older_snapshot(
    two_serials, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One history for both: a rollback held by the deletion check, then approved, must restore
    serial 1 exactly (content, guids, relationships) as serial 3."""
    state, second = two_serials
    assert _content(_dump(UPSTREAM_SOURCE)) == _content(second.entities)
    guids_before = {
        (e["typeName"], e["attributes"]["qualifiedName"]): e["guid"] for e in _dump(UPSTREAM_SOURCE)
    }
    monkeypatch.setenv("PUBLISH_PLATFORM_DELETION_THRESHOLD", "0.01")
    held = run_cli("rollback", UPSTREAM_SOURCE, "--to", "1", "--in-process", check=False)
    assert held.returncode == 1 and "FAILURE" in held.stdout
    assert state.current_serial(UPSTREAM_SOURCE) == 2
    assert _content(_dump(UPSTREAM_SOURCE)) == _content(second.entities)

    not_older = run_cli("rollback", UPSTREAM_SOURCE, "--to", "2", "--in-process", check=False)
    assert not_older.returncode == 1  # serial 2 is the current one: nothing to roll back to

    approved = run_cli(
        "rollback",
        UPSTREAM_SOURCE,
        "--to",
        "1",
        "--in-process",
        "--approve-by",
        "alice",
        "--reason",
        "bad release",
    )
    assert "SUCCESS" in approved.stdout
    assert state.current_serial(UPSTREAM_SOURCE) == 3

    restored = _dump(UPSTREAM_SOURCE)
    assert _content(restored) == _content(upstream_entities())
    # Entities that survived keep their guid; nothing is duplicated.
    for entity in restored:
        identity = (entity["typeName"], entity["attributes"]["qualifiedName"])
        if identity in guids_before:
            assert entity["guid"] == guids_before[identity]
    assert len(restored) == len(
        {(e["typeName"], e["attributes"]["qualifiedName"]) for e in restored}
    )
    assert [p.serial for p in state.history(UPSTREAM_SOURCE)] == [1, 2, 3]
    assert (
        state.read_snapshot(UPSTREAM_SOURCE, 3)
        .sort(["type_name", "qualified_name"])
        .select("type_name", "qualified_name", "hash")
        .equals(
            state.read_snapshot(UPSTREAM_SOURCE, 1)
            .sort(["type_name", "qualified_name"])
            .select("type_name", "qualified_name", "hash")
        )
    )
    catalog = SqlCatalog(settings.metastore_url)
    try:
        # The edges restored are exactly serial 1's.
        edges = catalog.relationships(UPSTREAM_SOURCE)
        expected = {
            (
                e["typeName"],
                e["attributes"]["qualifiedName"],
                name,
                v["typeName"],
                v["uniqueAttributes"]["qualifiedName"],
            )
            for e in upstream_entities()
            for name, v in e["attributes"].items()
            if isinstance(v, dict) and "uniqueAttributes" in v
        }
        assert edges == expected
    finally:
        catalog.close()
