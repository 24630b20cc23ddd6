"""Helpers shared by the tests: the real fixture run, synthetic entities, landing runs in S3."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import orjson

from publish_platform.config import S3Location, Settings
from publish_platform.entities import references_of
from publish_platform.landing import RunRef
from publish_platform.local_s3 import put_files


def _fixtures_dir() -> Path:
    candidates = [
        os.environ.get("PUBLISH_PLATFORM_FIXTURES", ""),
        str(Path(__file__).resolve().parents[2] / "shared" / "fixtures"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError("shared/fixtures not found (set PUBLISH_PLATFORM_FIXTURES)")


FIXTURES = _fixtures_dir()
UPSTREAM_RUN = FIXTURES / "upstream_postgres_run"
UPSTREAM_REF = RunRef("postgres", "pg-local-extract", "11111111-1111-4111-8111-111111111111")
UPSTREAM_SOURCE = "default/postgres/1745501106"
UPSTREAM_ENTITIES = 38
SEED_SAMPLE = FIXTURES / "seed_sample" / "entities.jsonl"
SOURCE = "default/test/1"
VOLATILE = ("lastSyncRun", "lastSyncRunAt", "lastSyncWorkflowName")


def upstream_files() -> dict[str, bytes]:
    """Every file of the real fixture run, keyed by its path relative to the run folder."""
    folder = UPSTREAM_RUN / UPSTREAM_REF.prefix_in_landing()
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def upstream_data() -> dict[str, bytes]:
    """Only the data files (``transformed/**/entities.json``) of the fixture run."""
    return {k: v for k, v in upstream_files().items() if k.endswith(".json")}


def upstream_entities() -> list[dict]:
    return [
        orjson.loads(line)
        for data in upstream_data().values()
        for line in data.splitlines()
        if line.strip()
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_sidecars(files: dict[str, bytes]) -> dict[str, bytes]:
    """The files plus a fresh ``.sha256`` sidecar for every data file."""
    out = {k: v for k, v in files.items() if not k.endswith(".sha256")}
    for key, data in list(out.items()):
        if key.startswith("transformed/") and key.endswith(".json"):
            out[key + ".sha256"] = sha256(data).encode()
    return out


def land(
    s3: Any,
    landing: S3Location,
    run: RunRef,
    files: dict[str, bytes],
    manifest: dict | bytes | None = None,
) -> None:
    """Upload a run folder the way the SDK does: data, then sidecars, then the manifest."""
    if manifest is not None:
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        files = {**files, "publish-request.json": body}
    put_files(s3, landing.bucket, run.prefix(landing), files)


def manifest_for(run: RunRef, source: str = UPSTREAM_SOURCE, **overrides: Any) -> dict:
    manifest = {
        "connection_qualified_name": source,
        "workflow_id": run.workflow_id,
        "run_id": run.run_id,
        "status": "SUCCEEDED",
        "source_timestamp": "2026-01-01T00:00:00Z",
        "processing_timestamp": "2026-01-01T00:05:00Z",
        "mode": "full",
    }
    manifest.update(overrides)
    return manifest


def resync(data: bytes, run_id: str, at_ms: int, workflow_name: str) -> bytes:
    """The same entities as a later sync would write them: only volatile attributes differ."""
    lines = []
    for line in data.splitlines():
        if not line.strip():
            continue
        entity = orjson.loads(line)
        entity["attributes"]["lastSyncRun"] = run_id
        entity["attributes"]["lastSyncRunAt"] = at_ms
        entity["attributes"]["lastSyncWorkflowName"] = workflow_name
        lines.append(orjson.dumps(entity))
    return b"\n".join(lines) + b"\n"


# --- synthetic entities ----------------------------------------------------------------------

PARENT_ATTRIBUTE = {
    "Schema": ("database", "Database"),
    "Table": ("atlanSchema", "Schema"),
    "View": ("atlanSchema", "Schema"),
    "Column": ("table", "Table"),
}


def ref(type_name: str, qualified_name: str) -> dict:
    return {
        "typeName": type_name,
        "attributes": None,
        "uniqueAttributes": {"qualifiedName": qualified_name},
    }


def entity(type_name: str, path: str = "", source: str = SOURCE, **attributes: Any) -> dict:
    """A minimal SDK-shaped entity; its parent reference is derived from its qualified name."""
    qualified_name = f"{source}/{path}" if path else source
    attrs: dict[str, Any] = {
        "qualifiedName": qualified_name,
        "name": path.rsplit("/", 1)[-1] if path else source,
        "connectionQualifiedName": source,
        "lastSyncRun": "run-1",
        "lastSyncRunAt": 1_700_000_000_000,
        "lastSyncWorkflowName": "wf",
    }
    if type_name in PARENT_ATTRIBUTE and "/" in path:
        attribute, parent_type = PARENT_ATTRIBUTE[type_name]
        attrs[attribute] = ref(parent_type, qualified_name.rsplit("/", 1)[0])
    attrs.update(attributes)
    return {"typeName": type_name, "status": "ACTIVE", "attributes": attrs, "customAttributes": {}}


def small_source(source: str = SOURCE) -> list[dict]:
    """Database db, schema s, tables t1 and t2, two columns each: 8 entities."""
    entities = [entity("Database", "db", source), entity("Schema", "db/s", source)]
    for table in ("t1", "t2"):
        entities.append(entity("Table", f"db/s/{table}", source))
        entities.extend(entity("Column", f"db/s/{table}/c{i}", source) for i in (1, 2))
    return entities


def jsonl(entities: list[dict]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in entities)


def identity(e: dict) -> tuple[str, str]:
    return e["typeName"], e["attributes"]["qualifiedName"]


def identities(entities: list[dict]) -> set[tuple[str, str]]:
    return {identity(e) for e in entities}


def edges(entities: list[dict]) -> set[tuple[str, str, str, str, str]]:
    """Reference edges of entities as the catalog reports them:
    (from type, from qualifiedName, attribute, to type, to qualifiedName)."""
    return {
        (*identity(e), r["attribute"], r["type_name"], r["qualified_name"])
        for e in entities
        for r in references_of(e["attributes"])
    }


def land_batch(
    s3: Any,
    settings: Settings,
    run: RunRef,
    entities: list[dict],
    source: str = SOURCE,
    **manifest: Any,
) -> None:
    """A run folder of synthetic entities, with its completion manifest (``manifest`` overrides
    fields such as ``source_timestamp`` or ``mode``)."""
    files = {"transformed/entities/entities.json": jsonl(entities)}
    land(s3, settings.landing_location, run, files, manifest_for(run, source, **manifest))


def run_batch(s3: Any, state: Any, settings: Settings, metastore: Any, run: RunRef, **plan: Any):
    """Diff, plan (references resolved against ``metastore``) and publish one batch, as the
    Dagster job does when no check holds it: ``(diff, plan, checks, publish)``."""
    from publish_platform.pipeline import run_diff, run_plan, run_publish

    key = run.partition_key
    diff = run_diff(s3, state, settings, key)
    _, batch_plan, checks = run_plan(state, settings, key, metastore, **plan)
    result = run_publish(state, settings, metastore, key)
    return diff, batch_plan, checks, result


def catalog_identities(catalog: Any, source: str = SOURCE) -> set[tuple[str, str]]:
    """Active entities of a source in the catalog; fails on a duplicated identity."""
    dumped = [identity(e) for e in catalog.dump(source)]
    assert len(dumped) == len(set(dumped)), "duplicate identity in the catalog"
    return set(dumped)


def sensor_tick(instance: Any, cursor: str | None = None) -> Any:
    """One evaluation of the landing sensor, as the daemon runs it (its ``SensorResult``); the
    partitions it asks for are added to ``instance``, as the daemon would."""
    from dagster import SensorResult, build_sensor_context

    from publish_platform.defs import defs

    sensor = defs.get_sensor_def("landing_sensor")
    context = build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources)
    result = sensor(context)
    assert isinstance(result, SensorResult)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    return result


def bucket_objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """Every object of a bucket: key -> content."""
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below a folder: ``"file <relative path>"`` -> content."""
    return {
        f"file {path.relative_to(folder)}": path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def planted_secrets_in(secrets: dict[str, str], places: dict[str, bytes]) -> list[str]:
    """Which planted secret appears where: ``"<secret> in <place>"`` for every hit (a secret is
    looked for as is and percent-encoded, as it would appear in a URL)."""
    from urllib.parse import quote

    found = []
    for name, value in secrets.items():
        forms = {value.encode(), quote(value, safe="").encode()}
        found += [
            f"{name} in {place}" for place, data in places.items() if any(f in data for f in forms)
        ]
    return found
