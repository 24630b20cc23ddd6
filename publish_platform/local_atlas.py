"""A local Atlas-compatible HTTP server: the Atlan endpoints pyatlan calls, for tests and trials.

It implements what the publish path uses, with Atlas semantics where they matter to us:

- ``POST /api/meta/entity/bulk`` — upsert; an entity is matched by guid, else by
  (typeName, qualifiedName); temporary (negative) guids come back in ``guidAssignments``; every
  reference (``{"typeName", "uniqueAttributes": {"qualifiedName"}}`` or ``{"typeName", "guid"}``)
  must resolve to an entity stored or in the same request, else the whole request fails with
  404 like Atlas; an entity whose content did not change is not listed in ``mutatedEntities``.
- ``DELETE /api/meta/entity/bulk?guid=…&deleteType=SOFT|HARD|PURGE`` — archive or remove.
- ``GET /api/meta/entity/guid/{guid}`` and ``GET /api/meta/entity/uniqueAttribute/type/{type}``.
- ``POST /api/meta/search/indexsearch`` — the Elasticsearch DSL subset pyatlan's FluentSearch
  produces (bool/term/terms/exists/prefix/match_all), with from/size paging and sort.

For drills it has switchable faults (a queue of canned 429/5xx answers), an Atlan-like tenant
rate limit (over budget: 429 with Retry-After, then every request blocked for the block period),
and a request log. ``/_control/…`` exposes the same over HTTP when it runs as its own process.
State is in memory: a trial server forgets everything when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

API = "/api/meta/"
CONTROL = "/_control/"
# Atlas's typedefs make these mandatory on every asset type, and type these as integers (a
# request with another value is refused whole, as Atlas does).
REQUIRED_ATTRIBUTES = ("qualifiedName", "name")
INTEGER_ATTRIBUTES = ("columnCount", "rowCount", "sizeBytes", "order", "maxLength")


class AtlasError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"errorCode": code, "errorMessage": message}
        self.headers = headers or {}


@dataclass
class Fault:
    """A canned answer for the next ``count`` matching requests."""

    status: int
    count: int = 1
    retry_after: float | None = None
    method: str | None = None  # only requests of this method
    path_contains: str | None = None  # only requests whose path contains this


@dataclass
class RateLimit:
    """Atlan's tenant limit: over ``budget`` requests per ``window_s``, answer 429 and block."""

    budget: int
    window_s: float = 60.0
    block_s: float = 60.0


@dataclass
class LoggedRequest:
    at: float
    method: str
    path: str
    status: int
    entities: int = 0  # entities in a bulk request body, guids in a bulk delete
    fault: str | None = None  # "fault" or "rate_limit" when the server refused it on purpose


@dataclass
class _Stored:
    entity: dict
    created: float
    updated: float
    version: int = 1


@dataclass
class AtlasStore:
    """The entities, faults, rate limit and request log of one server."""

    api_key: str | None = None
    entities: dict[str, _Stored] = field(default_factory=dict)
    by_identity: dict[tuple[str, str], str] = field(default_factory=dict)
    faults: deque[Fault] = field(default_factory=deque)
    rate_limit: RateLimit | None = None
    log: list[LoggedRequest] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _recent: deque[float] = field(default_factory=deque)
    _blocked_until: float = 0.0

    # --- drills --------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def set_rate_limit(self, limit: RateLimit | None) -> None:
        with self.lock:
            self.rate_limit = limit
            self._recent.clear()
            self._blocked_until = 0.0

    def requests(self) -> list[LoggedRequest]:
        with self.lock:
            return list(self.log)

    def clear_requests(self) -> None:
        with self.lock:
            self.log.clear()

    def dump(self, include_archived: bool = False) -> list[dict]:
        """Stored entities with their guid and resolved references, sorted by identity."""
        with self.lock:
            found = [
                self._resolved(stored.entity)
                for stored in self.entities.values()
                if include_archived or stored.entity["status"] == "ACTIVE"
            ]
        return sorted(found, key=lambda e: (e["typeName"], e["attributes"]["qualifiedName"]))

    def versions(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return {
                (s.entity["typeName"], s.entity["attributes"]["qualifiedName"]): s.version
                for s in self.entities.values()
            }

    # --- admission -----------------------------------------------------------------------

    def refusal(self, method: str, path: str) -> tuple[int, float | None, str] | None:
        """A fault or the rate limit answering this request instead of the API, if any."""
        with self.lock:
            for fault in list(self.faults):
                if fault.method and fault.method != method:
                    continue
                if fault.path_contains and fault.path_contains not in path:
                    continue
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault.status, fault.retry_after, "fault"
            limit = self.rate_limit
            if limit is None:
                return None
            now = time.time()
            if now < self._blocked_until:
                return 429, self._blocked_until - now, "rate_limit"
            while self._recent and self._recent[0] <= now - limit.window_s:
                self._recent.popleft()
            if len(self._recent) >= limit.budget:
                self._blocked_until = now + limit.block_s
                return 429, limit.block_s, "rate_limit"
            self._recent.append(now)
            return None

    # --- the Atlas API -------------------------------------------------------------------

    def bulk_upsert(self, entities: list[dict]) -> dict:
        with self.lock:
            now = time.time()
            assignments: dict[str, str] = {}
            planned: list[tuple[str, dict]] = []
            pending: dict[tuple[str, str], str] = {}
            for entity in entities:
                guid = self._guid_for(entity, pending)
                if str(entity.get("guid", "")).startswith("-"):
                    assignments[entity["guid"]] = guid
                attributes = entity["attributes"]
                pending[(entity["typeName"], attributes["qualifiedName"])] = guid
                planned.append((guid, entity))
            for _, entity in planned:
                for reference in _references(entity):
                    self._resolve(reference, pending)
            created: list[dict] = []
            updated: list[dict] = []
            for guid, entity in planned:
                stored = self.entities.get(guid)
                previous_status = stored.entity["status"] if stored else "ACTIVE"
                status = entity.get("status") or previous_status
                content = {
                    "typeName": entity["typeName"],
                    "guid": guid,
                    "status": status,
                    "attributes": dict(entity.get("attributes") or {}),
                    "relationshipAttributes": dict(entity.get("relationshipAttributes") or {}),
                    "customAttributes": dict(entity.get("customAttributes") or {}),
                }
                if stored is None:
                    self.entities[guid] = _Stored(content, now, now)
                    created.append(_header(content))
                else:
                    # Atlas keeps attributes a request leaves out; a no-op is not a mutation.
                    merged = {
                        **content,
                        "attributes": {**stored.entity["attributes"], **content["attributes"]},
                    }
                    if merged != stored.entity:
                        stored.entity, stored.updated = merged, now
                        stored.version += 1
                        updated.append(_header(merged))
                identity = (entity["typeName"], entity["attributes"]["qualifiedName"])
                self.by_identity[identity] = guid
            mutated = {
                name: items for name, items in (("CREATE", created), ("UPDATE", updated)) if items
            }
            return {"mutatedEntities": mutated, "guidAssignments": assignments}

    def bulk_delete(self, guids: list[str], delete_type: str) -> dict:
        with self.lock:
            missing = [guid for guid in guids if guid not in self.entities]
            if missing:
                raise AtlasError(
                    404,
                    "ATLAS-404-00-005",
                    f"Given instance guid {missing[0]} is invalid/not found",
                )
            deleted = []
            for guid in dict.fromkeys(guids):
                stored = self.entities[guid]
                if delete_type in ("HARD", "PURGE"):
                    del self.entities[guid]
                    identity = (
                        stored.entity["typeName"],
                        stored.entity["attributes"]["qualifiedName"],
                    )
                    self.by_identity.pop(identity, None)
                    deleted.append({**_header(stored.entity), "status": "DELETED"})
                elif stored.entity["status"] != "DELETED":
                    stored.entity = {**stored.entity, "status": "DELETED"}
                    stored.version += 1
                    stored.updated = time.time()
                    deleted.append(_header(stored.entity))
            return {"mutatedEntities": {"DELETE": deleted}} if deleted else {}

    def get_by_guid(self, guid: str) -> dict:
        with self.lock:
            stored = self.entities.get(guid)
            if stored is None:
                raise AtlasError(
                    404, "ATLAS-404-00-005", f"Given instance guid {guid} is invalid/not found"
                )
            return {"entity": self._resolved(stored.entity), "referredEntities": {}}

    def get_by_unique_attribute(self, type_name: str, qualified_name: str) -> dict:
        with self.lock:
            guid = self.by_identity.get((type_name, qualified_name))
            if guid is None:
                raise AtlasError(
                    404,
                    "ATLAS-404-00-009",
                    f"Instance {type_name} with unique attribute {{qualifiedName={qualified_name}}}"
                    " does not exist",
                )
            return self.get_by_guid(guid)

    def index_search(self, request: dict) -> dict:
        dsl = request.get("dsl") or {}
        query = dsl.get("query") or {"match_all": {}}
        start, size = int(dsl.get("from", 0)), int(dsl.get("size", 10))
        wanted = set(request.get("attributes") or ())
        with self.lock:
            hits = [
                stored.entity
                for stored in self.entities.values()
                if _matches(query, _document(stored.entity))
            ]
        for sort in reversed(dsl.get("sort") or [{"__guid": {"order": "asc"}}]):
            ((name, spec),) = sort.items()
            order = spec.get("order", "asc") if isinstance(spec, dict) else spec
            hits.sort(
                key=lambda e, n=name: str(_document(e).get(_field(n), "")), reverse=order == "desc"
            )
        page = hits[start : start + size]
        entities = [
            {
                **_header(entity),
                "attributes": {
                    key: value
                    for key, value in entity["attributes"].items()
                    if key in wanted or key in ("qualifiedName", "name")
                },
            }
            for entity in page
        ]
        answer: dict[str, Any] = {"approximateCount": len(hits), "searchParameters": {"dsl": dsl}}
        if entities:
            answer["entities"] = entities
        return answer

    # --- internals -----------------------------------------------------------------------

    def _guid_for(self, entity: dict, pending: dict[tuple[str, str], str]) -> str:
        type_name = entity.get("typeName")
        attributes = entity.get("attributes")
        if not isinstance(type_name, str) or not type_name or not isinstance(attributes, dict):
            raise AtlasError(400, "ATLAS-400-00-01A", "entity without typeName or attributes")
        for name in REQUIRED_ATTRIBUTES:
            if not isinstance(attributes.get(name), str) or not attributes[name]:
                raise AtlasError(
                    400,
                    "ATLAS-400-00-029",
                    f"{type_name}: mandatory attribute {name} is missing or invalid",
                )
        for name in INTEGER_ATTRIBUTES:
            value = attributes.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise AtlasError(
                    400,
                    "ATLAS-400-00-08A",
                    f"{type_name} {attributes['qualifiedName']}: invalid value {value!r}"
                    f" for attribute {name} of type long",
                )
        guid = entity.get("guid")
        if isinstance(guid, str) and guid and not guid.startswith("-"):
            if guid not in self.entities:
                raise AtlasError(
                    404, "ATLAS-404-00-005", f"Given instance guid {guid} is invalid/not found"
                )
            return guid
        identity = (type_name, attributes["qualifiedName"])
        return pending.get(identity) or self.by_identity.get(identity) or str(uuid.uuid4())

    def _resolve(self, reference: dict, pending: dict[tuple[str, str], str]) -> str:
        guid = reference.get("guid")
        if isinstance(guid, str) and not guid.startswith("-") and guid in self.entities:
            return guid
        unique = reference.get("uniqueAttributes") or {}
        identity = (reference.get("typeName"), unique.get("qualifiedName"))
        found = pending.get(identity) or self.by_identity.get(identity)  # type: ignore[arg-type]
        if found is None:
            raise AtlasError(
                404,
                "ATLAS-404-00-00A",
                f"Referenced entity AtlasObjectId{{typeName={identity[0]},"
                f" uniqueAttributes={{qualifiedName={identity[1]}}}}} is not found",
            )
        return found

    def _resolved(self, entity: dict) -> dict:
        """The entity as GET returns it: references carry the guid they resolved to."""

        def resolve(value: Any) -> Any:
            if _is_reference(value):
                unique = value.get("uniqueAttributes") or {}
                guid = value.get("guid") or self.by_identity.get(
                    (value["typeName"], unique.get("qualifiedName"))
                )
                return {**value, "guid": guid}
            if isinstance(value, list):
                return [resolve(item) for item in value]
            return value

        return {
            **entity,
            "attributes": {k: resolve(v) for k, v in entity["attributes"].items()},
            "relationshipAttributes": {
                k: resolve(v) for k, v in entity.get("relationshipAttributes", {}).items()
            },
        }


def _is_reference(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and "typeName" in value
        and ("uniqueAttributes" in value or "guid" in value)
    )


def _references(entity: dict) -> Iterator[dict]:
    for section in ("attributes", "relationshipAttributes"):
        for value in (entity.get(section) or {}).values():
            for item in value if isinstance(value, list) else [value]:
                if _is_reference(item):
                    yield item


def _header(entity: dict) -> dict:
    attributes = entity["attributes"]
    return {
        "typeName": entity["typeName"],
        "guid": entity["guid"],
        "status": entity["status"],
        "displayText": attributes.get("name"),
        "attributes": {
            "qualifiedName": attributes["qualifiedName"],
            "name": attributes.get("name"),
        },
    }


def _field(name: str) -> str:
    return name.removesuffix(".keyword").removesuffix(".text")


def _document(entity: dict) -> dict:
    """The searchable fields of an entity, named as Atlan's index names them."""
    document = {
        key: value
        for key, value in entity["attributes"].items()
        if value is None or isinstance(value, (str, int, float, bool))
    }
    document.update(
        {"__guid": entity["guid"], "__typeName": entity["typeName"], "__state": entity["status"]}
    )
    return document


def _matches(query: dict, document: dict) -> bool:
    if len(query) != 1:
        raise AtlasError(400, "ATLAS-400-00-0A0", f"unsupported query: {json.dumps(query)[:200]}")
    ((kind, body),) = query.items()
    if kind == "match_all":
        return True
    if kind == "bool":
        musts = [*body.get("filter", []), *body.get("must", [])]
        if isinstance(body.get("filter"), dict):
            musts = [body["filter"], *body.get("must", [])]
        if not all(_matches(q, document) for q in musts):
            return False
        if any(_matches(q, document) for q in body.get("must_not", [])):
            return False
        shoulds = body.get("should", [])
        needed = int(body.get("minimum_should_match", 1 if shoulds and not musts else 0))
        return sum(_matches(q, document) for q in shoulds) >= needed
    ((name, spec),) = body.items()
    value = document.get(_field(name))
    if kind == "term":
        expected = spec.get("value") if isinstance(spec, dict) else spec
        if isinstance(spec, dict) and spec.get("case_insensitive") and isinstance(value, str):
            return value.lower() == str(expected).lower()
        return value == expected
    if kind == "terms":
        return value in set(spec)
    if kind == "exists":
        return document.get(_field(body["field"])) is not None
    if kind == "prefix":
        expected = spec.get("value") if isinstance(spec, dict) else spec
        return isinstance(value, str) and value.startswith(expected)
    raise AtlasError(400, "ATLAS-400-00-0A0", f"unsupported query kind: {kind}")


class _Handler(BaseHTTPRequestHandler):
    store: AtlasStore  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def log_message(self, *args: object) -> None:
        pass

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if url.path.startswith(CONTROL):
            self._control(method, url.path[len(CONTROL) :], raw)
            return
        logged = LoggedRequest(time.time(), method, url.path, 200)
        headers: dict[str, str] = {}
        try:
            body = json.loads(raw) if raw else {}
            if isinstance(body, dict) and isinstance(body.get("entities"), list):
                logged.entities = len(body["entities"])
            elif method == "DELETE":
                logged.entities = len(query.get("guid", []))
            if (
                self.store.api_key
                and self.headers.get("authorization") != f"Bearer {self.store.api_key}"
            ):
                raise AtlasError(
                    401, "ATLAS-401-00-001", "unauthorized: missing or invalid API token"
                )
            refused = self.store.refusal(method, url.path)
            if refused is not None:
                status, retry_after, logged.fault = refused
                headers = {"Retry-After": f"{retry_after:.3f}"} if retry_after is not None else {}
                message = "Rate limit exceeded" if status == 429 else "injected fault"
                raise AtlasError(status, f"ATLAS-{status}-00-000", message, headers)
            path = url.path[len(API) :] if url.path.startswith(API) else None
            answer = self._api(method, path, query, body)
        except AtlasError as exc:
            logged.status, answer, headers = exc.status, exc.body, exc.headers
        except (ValueError, KeyError, TypeError) as exc:
            logged.status = 400
            answer = {"errorCode": "ATLAS-400-00-001", "errorMessage": f"bad request: {exc}"}
        with self.store.lock:  # logged before the answer leaves: a client never outruns the log
            self.store.log.append(logged)
        self._send(logged.status, answer, headers)

    def _api(self, method: str, path: str | None, query: dict[str, list[str]], body: Any) -> dict:
        store = self.store
        if path in ("entity/bulk", "entity/bulk/") and method == "POST":
            return store.bulk_upsert(body["entities"])
        if path in ("entity/bulk", "entity/bulk/") and method == "DELETE":
            return store.bulk_delete(
                query.get("guid", []), (query.get("deleteType") or ["SOFT"])[0]
            )
        if path and path.startswith("entity/guid/") and method == "GET":
            return store.get_by_guid(unquote(path.removeprefix("entity/guid/")))
        if path and path.startswith("entity/uniqueAttribute/type/") and method == "GET":
            type_name = unquote(path.removeprefix("entity/uniqueAttribute/type/"))
            return store.get_by_unique_attribute(type_name, query["attr:qualifiedName"][0])
        if path in ("search/indexsearch", "search/indexsearch/") and method == "POST":
            return store.index_search(body)
        raise AtlasError(404, "ATLAS-404-00-001", f"no such endpoint: {method} {self.path}")

    def _control(self, method: str, name: str, raw: bytes) -> None:
        store = self.store
        body = json.loads(raw) if raw else {}
        if name == "faults" and method == "POST":
            store.add_fault(Fault(**body))
        elif name == "rate_limit" and method == "POST":
            store.set_rate_limit(RateLimit(**body) if body else None)
        elif name == "requests" and method == "GET":
            self._send(200, {"requests": [asdict(r) for r in store.requests()]})
            return
        elif name == "requests" and method == "DELETE":
            store.clear_requests()
        elif name == "entities" and method == "GET":
            self._send(200, {"entities": store.dump(include_archived=True)})
            return
        else:
            self._send(404, {"errorMessage": f"no such control: {method} {name}"})
            return
        self._send(200, {})

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


class LocalAtlas:
    """The server on 127.0.0.1 in a background thread; ``url`` is what ATLAN_BASE_URL takes."""

    def __init__(self, port: int = 0, api_key: str | None = None) -> None:
        self.store = AtlasStore(api_key=api_key)
        handler = type("Handler", (_Handler,), {"store": self.store})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> LocalAtlas:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=21000)
    parser.add_argument(
        "--api-key-env", default="ATLAN_API_KEY", help="variable holding the key to require"
    )
    args = parser.parse_args(argv)
    with LocalAtlas(args.port, os.environ.get(args.api_key_env)) as atlas:
        print(f"local Atlas-compatible server on {atlas.url} (Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            atlas.thread.join()


if __name__ == "__main__":
    main()
