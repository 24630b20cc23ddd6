"""Demo workflow runs for the embedded mode and the end-to-end tests.

``seed_sample_run`` lays the seed's sample entities out as an SDK 3.x run folder; ``changed_run``
derives a second run of the fixture's source with real changes (added, changed and removed
entities) and new volatile values everywhere, as the next scheduled extraction would.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from publish_platform.landing import MANIFEST_NAME, RUNS_ROOT


@dataclass
class DemoRun:
    root: Path  # folder that mirrors the object store: root/artifacts/apps/...
    partition_key: str
    entities: list[dict]  # every entity of the run, as landed


def shared_fixtures() -> Path:
    """``../shared/fixtures`` beside the project checkout."""
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def read_run_entities(run_folder: Path) -> dict[str, list[dict]]:
    """Entities of a landed 3.x run folder, by entity folder name."""
    found = {}
    for path in sorted((run_folder / "transformed").glob("*/entities.json")):
        found[path.parent.name] = [
            orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()
        ]
    return found


def run_files(files: dict[str, list[dict]], manifest: dict | None = None) -> dict[str, bytes]:
    """A 3.x run folder's files by path relative to it: entities, .sha256 sidecars, manifest."""
    found: dict[str, bytes] = {}
    for entity_folder, rows in files.items():
        data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        found[f"transformed/{entity_folder}/entities.json"] = data
        found[f"transformed/{entity_folder}/entities.json.sha256"] = (
            hashlib.sha256(data).hexdigest().encode()
        )
    if manifest is not None:
        found[MANIFEST_NAME] = orjson.dumps(manifest)
    return found


def manifest_for(connection: str, workflow_id: str, run_id: str) -> dict:
    """The completion manifest of a successful full run that read its source just now."""
    now = datetime.now(UTC).isoformat()
    return {
        "connection_qualified_name": connection,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "status": "SUCCEEDED",
        "source_timestamp": now,
        "processing_timestamp": now,
        "mode": "full",
    }


def write_run(
    root: Path,
    app: str,
    workflow_id: str,
    run_id: str,
    files: dict[str, list[dict]],
    manifest: dict | None = None,
) -> DemoRun:
    """Write a 3.x run folder with .sha256 sidecars (and optionally a manifest) under ``root``."""
    run_folder = root / RUNS_ROOT / app / "workflows" / workflow_id / run_id
    for relative, data in run_files(files, manifest).items():
        (run_folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (run_folder / relative).write_bytes(data)
    entities = [row for rows in files.values() for row in rows]
    return DemoRun(root, f"{app}/{workflow_id}/{run_id}", entities)


def seed_sample_run(root: Path, fixtures: Path | None = None) -> DemoRun:
    sample = (fixtures or shared_fixtures()) / "seed_sample" / "entities.jsonl"
    by_type: dict[str, list[dict]] = {}
    for line in sample.read_bytes().splitlines():
        if line.strip():
            entity = orjson.loads(line)
            by_type.setdefault(entity["typeName"].lower(), []).append(entity)
    return write_run(root, "postgres", "seed-sample", str(uuid.uuid4()), by_type)


def fixture_root(fixtures: Path | None = None) -> Path:
    """The fixture folder that mirrors the object store (holds ``artifacts/``)."""
    return (fixtures or shared_fixtures()) / "upstream_postgres_run"


def fixture_run_folder(fixtures: Path | None = None) -> Path:
    return next((fixture_root(fixtures) / RUNS_ROOT).glob("*/workflows/*/*"))


def partition_key_of(run_folder: Path) -> str:
    """``<app>/<workflow_id>/<run_id>`` of a local run folder laid out as in the landing."""
    return f"{run_folder.parents[2].name}/{run_folder.parent.name}/{run_folder.name}"


def _parent_of(column: dict) -> str | None:
    """The qualifiedName of the table or view a column belongs to."""
    for attribute in ("table", "view", "materialisedView", "tablePartition"):
        ref = column["attributes"].get(attribute)
        if isinstance(ref, dict):
            return ref.get("uniqueAttributes", {}).get("qualifiedName")
    return None


def changed_run(root: Path, fixtures: Path | None = None, run_id: str | None = None) -> DemoRun:
    """The fixture's source, extracted again: one table dropped, one added, two changed.

    Every entity gets new volatile values (lastSyncRun, lastSyncRunAt), which must not count as
    changes. It lands with a publish-request.json manifest (mode full).
    """
    source_folder = fixture_run_folder(fixtures)
    app = source_folder.parents[2].name
    workflow_id = source_folder.parent.name
    run_id = run_id or str(uuid.uuid4())
    files = read_run_entities(source_folder)
    now_ms = int(time.time() * 1000)

    tables = files["table"]
    dropped = tables[-1]["attributes"]["qualifiedName"]
    files["table"] = [t for t in tables if t["attributes"]["qualifiedName"] != dropped]
    files["column"] = [c for c in files["column"] if _parent_of(c) != dropped]
    for table in files["table"][:2]:
        table["attributes"]["description"] = f"Changed by the demo at {now_ms}"
    template = files["table"][0]
    added_qn = template["attributes"]["schemaQualifiedName"] + "/demo_added_table"
    added = orjson.loads(orjson.dumps(template))
    added["attributes"].update(
        name="demo_added_table",
        qualifiedName=added_qn,
        columnCount=1,
        description="Added by the demo",
    )
    files["table"].append(added)
    column = orjson.loads(orjson.dumps(files["column"][0]))
    column["attributes"].update(
        name="id",
        qualifiedName=added_qn + "/id",
        tableName="demo_added_table",
        tableQualifiedName=added_qn,
        table={
            "typeName": "Table",
            "attributes": None,
            "uniqueAttributes": {"qualifiedName": added_qn},
        },
    )
    files["column"].append(column)

    connection = ""
    for rows in files.values():
        for entity in rows:
            attributes = entity["attributes"]
            attributes["lastSyncRun"] = run_id
            attributes["lastSyncRunAt"] = now_ms
            connection = attributes["connectionQualifiedName"]
    manifest = manifest_for(connection, workflow_id, run_id)
    return write_run(root, app, workflow_id, run_id, files, manifest)


def resynced_run(root: Path, previous: DemoRun) -> DemoRun:
    """``previous`` extracted again with nothing changed but the volatile attributes."""
    app, workflow_id, _ = previous.partition_key.split("/")
    run_id = str(uuid.uuid4())
    now_ms = int(time.time() * 1000)
    rows = [
        {**e, "attributes": {**e["attributes"], "lastSyncRun": run_id, "lastSyncRunAt": now_ms}}
        for e in previous.entities
    ]
    return write_run(root, app, workflow_id, run_id, {"all": rows})
