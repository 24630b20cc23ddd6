"""Atlan as the metastore, through pyatlan: bulk upserts, archive/purge, one budget per tenant.

pyatlan brings the client (auth from ``ATLAN_BASE_URL`` / ``ATLAN_API_KEY``, endpoints, error
mapping). Two choices keep the publish path exact and cheap:

- Entities go to ``entity/bulk`` as the connector wrote them (raw Atlas JSON through the client's
  ``BULK_UPDATE`` call). pyatlan's typed asset models would reject the SDK's reference form
  (``uniqueAttributes`` without a guid) and drop any attribute they do not model.
- Deletes are one ``DELETE entity/bulk`` per chunk (``purge_by_guid`` with SOFT or PURGE).
  ``delete_by_guid`` would fetch and poll each entity: two or more requests per entity.

Every HTTP request goes through the tenant's shared budget (``TenantRateLimiter``) via an httpx
request hook, and pyatlan's own retries are off: a 429 starts a tenant-wide cool-down and is
waited out here (up to ``atlan_throttle_retries`` times, none longer than
``atlan_max_inline_wait_seconds``), then becomes ``ThrottledError`` (tier 2); a 5xx, a timeout
or a refused connection becomes ``TransientMetastoreError`` (tier 1); any other error fails the
chunk, which the publish step splits to isolate the entity at fault.

pyatlan is imported only here, and this module only when the metastore is Atlan: its import
costs seconds that no other code path pays.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from httpx_retries import Retry
from pyatlan.client.atlan import AtlanClient
from pyatlan.client.constants import BULK_UPDATE
from pyatlan.errors import AtlanError
from pyatlan.model.assets import Asset
from pyatlan.model.enums import AtlanDeleteType
from pyatlan.model.fluent_search import CompoundQuery, FluentSearch
from pyatlan.model.search import IndexSearchRequest

from publish_platform.config import Settings
from publish_platform.metastores.base import (
    EntityWrite,
    Identity,
    MetastoreRefusedError,
    ThrottledError,
    TransientMetastoreError,
    WriteResult,
)
from publish_platform.metastores.rate_limit import TenantRateLimiter

log = logging.getLogger(__name__)

T = TypeVar("T")

# Identities per index search: one page each, well inside Atlan's terms-query limits.
LOOKUP_BATCH = 200
# Upsert options as pyatlan's ``asset.save`` sends them: leave tags and custom metadata alone.
SAVE_OPTIONS = {
    "replaceTags": False,
    "appendTags": False,
    "replaceBusinessAttributes": False,
    "overwriteBusinessAttributes": False,
}
MUTATION_KINDS = ("CREATE", "UPDATE", "PARTIAL_UPDATE")


class AtlanRequestError(RuntimeError):
    """Atlan refused a request for its content (4xx): the chunk fails and is split."""


class AtlanMetastore:
    def __init__(self, settings: Settings) -> None:
        try:
            # Reads ATLAN_BASE_URL and ATLAN_API_KEY; retries are ours (budget, cool-down, tiers).
            self.client = AtlanClient(retry=Retry(total=0))
        except ValueError as exc:  # pydantic's validation error: the variables are missing
            raise RuntimeError(
                "PUBLISH_PLATFORM_METASTORE=atlan needs ATLAN_BASE_URL and ATLAN_API_KEY"
            ) from exc
        self.settings = settings
        self.tenant = urlsplit(str(self.client.base_url)).netloc
        self.limiter = TenantRateLimiter(
            settings.rate_limit_database,
            self.tenant,
            settings.atlan_request_budget,
            settings.atlan_budget_window_seconds,
        )
        self.requests = 0  # HTTP requests sent by this instance (retries included)
        self._statuses: list[tuple[int, float | None]] = []
        session = self.client._session  # pyatlan exposes no hook of its own
        session.event_hooks = {
            "request": [*session.event_hooks["request"], self._before_request],
            "response": [*session.event_hooks["response"], self._after_response],
        }

    # --- the Metastore contract ----------------------------------------------------------

    def upsert(self, writes: Sequence[EntityWrite]) -> list[WriteResult]:
        if not writes:
            return []
        entities = [
            {**write.entity, "guid": write.guid or f"-{index}"}
            for index, write in enumerate(writes, start=1)
        ]
        response = self._call(
            "bulk upsert",
            lambda: self.client._call_api(BULK_UPDATE, SAVE_OPTIONS, {"entities": entities}),
        )
        assigned = response.get("guidAssignments") or {}
        mutated = {
            (header["typeName"], header["attributes"]["qualifiedName"]): header["guid"]
            for kind in MUTATION_KINDS
            for header in (response.get("mutatedEntities") or {}).get(kind) or []
        }
        guids = {
            (write.type_name, write.qualified_name): write.guid
            or assigned.get(entity["guid"])
            or mutated.get((write.type_name, write.qualified_name))
            for write, entity in zip(writes, entities, strict=True)
        }
        # Atlan leaves unchanged entities out of its answer: look up only guids still unknown.
        unknown = [identity for identity, guid in guids.items() if guid is None]
        if unknown:
            guids.update(self._lookup_guids(unknown, active_only=False))
        return [
            WriteResult(w.type_name, w.qualified_name, True, guid)
            if (guid := guids[(w.type_name, w.qualified_name)])
            else WriteResult(
                w.type_name, w.qualified_name, False, None, "Atlan accepted it but has no guid"
            )
            for w in writes
        ]

    def delete(self, identities: Sequence[Identity], purge: bool = False) -> list[WriteResult]:
        if not identities:
            return []
        keys = [(i.type_name, i.qualified_name) for i in identities]
        guids = {key: i.guid for key, i in zip(keys, identities, strict=True)}
        unknown = [key for key, guid in guids.items() if guid is None]
        if unknown:
            guids.update(self._lookup_guids(unknown, active_only=not purge))
        targets = sorted({guid for guid in guids.values() if guid})
        if targets:
            try:
                self._delete_guids(targets, purge)
            except AtlanRequestError:
                # Some are gone already (deleted outside the platform): delete what remains.
                remaining = self._lookup_guids(keys, active_only=not purge)
                targets = sorted(set(remaining.values()))
                if targets:
                    self._delete_guids(targets, purge)
        # What was already gone (or archived, when archiving) is deleted: nothing lost.
        return [WriteResult(key[0], key[1], True, guids.get(key)) for key in keys]

    def existing(self, identities: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        return set(self._lookup_guids(list(identities), active_only=True))

    def dump(self, source: str | None = None) -> Iterator[dict]:
        """Active entities of a source as Atlan's index has them: identity, guid, name."""
        search = FluentSearch().where(CompoundQuery.active_assets()).page_size(LOOKUP_BATCH)
        if source is not None:
            search = search.where(Asset.CONNECTION_QUALIFIED_NAME.eq(source))
        request = search.include_on_results(Asset.CONNECTION_QUALIFIED_NAME).to_request()
        for asset in self._search("search", request):
            yield {
                "typeName": asset.type_name,
                "guid": asset.guid,
                "status": "ACTIVE",
                "attributes": {
                    "qualifiedName": asset.qualified_name,
                    "name": asset.name,
                    "connectionQualifiedName": asset.connection_qualified_name,
                },
            }

    def close(self) -> None:
        self.limiter.close()
        self.client._session.close()

    # --- requests ------------------------------------------------------------------------

    def _delete_guids(self, guids: list[str], purge: bool) -> None:
        delete_type = AtlanDeleteType.PURGE if purge else AtlanDeleteType.SOFT
        self._call(
            "bulk delete",
            lambda: self.client.asset.purge_by_guid(guids, delete_type=delete_type),
        )

    def _lookup_guids(
        self, identities: list[tuple[str, str]], active_only: bool
    ) -> dict[tuple[str, str], str]:
        """Guids of these identities, LOOKUP_BATCH per index search (never one per entity)."""
        found: dict[tuple[str, str], str] = {}
        wanted = set(identities)
        for start in range(0, len(identities), LOOKUP_BATCH):
            batch = identities[start : start + LOOKUP_BATCH]
            search = (
                FluentSearch()
                .where(Asset.QUALIFIED_NAME.within(sorted({qn for _, qn in batch})))
                .where(Asset.TYPE_NAME.within(sorted({t for t, _ in batch})))
                .page_size(LOOKUP_BATCH)
            )
            if active_only:
                search = search.where(CompoundQuery.active_assets())
            for asset in self._search("guid lookup", search.to_request()):
                key = (asset.type_name, asset.qualified_name)
                if key in wanted and asset.guid:
                    found[key] = asset.guid
        return found

    def _search(self, what: str, request: IndexSearchRequest) -> list[Asset]:
        """Every hit of an index search; one request when the first page holds them all
        (iterating pyatlan's results would always ask for one more, empty, page)."""

        def run() -> list[Asset]:
            results = self.client.asset.search(request)
            page = list(results.current_page())
            return page if results.count <= len(page) else list(results)

        return self._call(what, run)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """One logical request, with the tenant's throttling handled and errors classified."""
        throttled = 0
        while True:
            self._statuses.clear()
            error: Exception | None = None
            result: Any = None
            try:
                result = call()
            except httpx.TransportError as exc:  # refused, reset, timed out
                raise TransientMetastoreError(f"Atlan {what}: {type(exc).__name__}: {exc}") from exc
            except (AtlanError, TypeError, AttributeError) as exc:
                # TypeError/AttributeError: pyatlan parsing the None it returns for a 503.
                error = exc
            status, retry_after = self._statuses[-1] if self._statuses else (200, None)
            if status == 429:
                wait = self.limiter.blocked_for()
                limit = self.settings.atlan_max_inline_wait_seconds
                if throttled < self.settings.atlan_throttle_retries and wait <= limit:
                    throttled += 1
                    log.warning("Atlan %s throttled (429): every worker pauses %.1fs", what, wait)
                    continue  # the next request waits out the cool-down in the request hook
                raise ThrottledError(
                    f"Atlan {what}: throttled (HTTP 429), {throttled} cool-downs waited in the"
                    f" step, {wait:.0f}s of cool-down left (a step waits {limit:.0f}s at most)",
                    retry_after=max(wait, retry_after or 0.0),
                )
            if status >= 500:
                raise TransientMetastoreError(f"Atlan {what}: HTTP {status}")
            if status in (401, 403):
                raise MetastoreRefusedError(
                    f"Atlan {what}: HTTP {status}, the API key (ATLAN_API_KEY) was refused"
                )
            if error is not None:
                raise AtlanRequestError(f"Atlan {what}: {error}") from error
            if result is None:
                raise TransientMetastoreError(f"Atlan {what}: empty answer (HTTP {status})")
            return result

    def _before_request(self, request: httpx.Request) -> None:
        waited = self.limiter.acquire()
        if waited > 0.5:
            log.info("Atlan request waited %.1fs for the tenant's budget or cool-down", waited)
        self.requests += 1

    def _after_response(self, response: httpx.Response) -> None:
        retry_after = _retry_after(response.headers.get("Retry-After"))
        self._statuses.append((response.status_code, retry_after))
        if response.status_code == 429:
            pause = retry_after if retry_after is not None else self.settings.atlan_cooldown_seconds
            self.limiter.cool_down(pause)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None
