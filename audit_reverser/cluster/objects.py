"""Objects read from the API for events that do not carry them (Metadata or Request audit
level, ``scale`` and other subresource writes, deletes without a body).

- The resource is found through discovery: the preferred version of its group when the event
  names none, and whether the resource exists at all. Discovery is cached per group version
  and read again on a miss, so a CRD installed after start is found.
- A GET answers what happened before it was sent, never what came after: a burst of events
  for one object shares one GET because the processor folds the events queued behind the one
  it reads for (one commit, by the latest of them); here, concurrent reads of one object
  share the GET in flight. A finished GET is never reused: an event received after it may
  hold a change it does not show.
- At most ``concurrency`` GETs run at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from audit_reverser.cluster.api import KubeApi
from audit_reverser.events import ObjectRef
from audit_reverser.pipeline.resolve import UnknownResource

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class ApiResource:
    """A resource type the API serves and can list."""

    group: str
    version: str
    name: str  # plural
    kind: str
    namespaced: bool

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        """The cluster-wide collection."""
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{prefix}/{self.name}"


class ApiObjects:
    """Implements :class:`audit_reverser.pipeline.resolve.ObjectSource` over the API."""

    def __init__(self, api: KubeApi, *, concurrency: int = 8) -> None:
        self._api = api
        self._gate = asyncio.Semaphore(concurrency)
        self._in_flight: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        # (group, version) -> {resource: namespaced}; group -> preferred version
        self._resources: dict[tuple[str, str], dict[str, bool]] = {}
        self._preferred: dict[str, str] = {}

    async def read(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        """The object ``ref`` names (its parent for a subresource) as the API has it now;
        None when it does not exist. UnknownResource when the API has no such resource."""
        return await self._get(f"{await self._collection(ref)}/{ref.name}")

    async def _collection(self, ref: ObjectRef) -> str:
        """The path of ``ref``'s collection (in its namespace, for a namespaced resource),
        found through discovery; UnknownResource when the API serves no such resource."""
        version = ref.api_version or await self._preferred_version(ref.api_group)
        resources = await self._discover(ref.api_group, version, refresh=False)
        if ref.resource not in resources:
            resources = await self._discover(ref.api_group, version, refresh=True)
        if ref.resource not in resources:
            group_version = f"{ref.api_group}/{version}" if ref.api_group else version
            raise UnknownResource(f"the API serves no {ref.resource} in {group_version}")
        prefix = f"/apis/{ref.api_group}/{version}" if ref.api_group else f"/api/{version}"
        scope = f"/namespaces/{ref.namespace}" if resources[ref.resource] else ""
        return f"{prefix}{scope}/{ref.resource}"

    async def names(self, ref: ObjectRef) -> set[str]:
        """The names of the objects of ``ref``'s resource in its namespace (all pages)."""
        collection = await self._collection(ref)
        found: set[str] = set()
        token = ""
        while True:
            query = [("limit", "500")] + ([("continue", token)] if token else [])
            async with self._gate:
                page = await self._api.get(collection, query)
            for item in (page or {}).get("items") or []:
                name = (item.get("metadata") or {}).get("name") if isinstance(item, dict) else None
                if isinstance(name, str):
                    found.add(name)
            token = str(((page or {}).get("metadata") or {}).get("continue") or "")
            if not token:
                return found

    async def _get(self, path: str) -> dict[str, Any] | None:
        pending = self._in_flight.get(path)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._in_flight[path] = future
        try:
            async with self._gate:
                body = await self._api.get(path)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # seen here; waiters get it too
            raise
        else:
            future.set_result(body)
            return body
        finally:
            del self._in_flight[path]

    async def listable(self) -> list[ApiResource]:
        """Every resource type the API serves that can be listed (preferred versions), read
        from discovery now: a snapshot must see CRDs installed a minute ago."""
        groups = [("", "v1")]
        for group in ((await self._api.get("/apis")) or {}).get("groups") or []:
            preferred = (group.get("preferredVersion") or {}).get("version")
            if group.get("name") and preferred:
                groups.append((str(group["name"]), str(preferred)))
        found = []
        for group_name, version in groups:
            path = f"/apis/{group_name}/{version}" if group_name else f"/api/{version}"
            for item in ((await self._api.get(path)) or {}).get("resources") or []:
                name = item.get("name")
                if (
                    isinstance(name, str)
                    and "/" not in name
                    and "list" in (item.get("verbs") or [])
                ):
                    found.append(
                        ApiResource(
                            group=group_name,
                            version=version,
                            name=name,
                            kind=str(item.get("kind") or ""),
                            namespaced=bool(item.get("namespaced")),
                        )
                    )
        return found

    async def _preferred_version(self, group: str) -> str:
        if not group:
            return "v1"
        known = self._preferred.get(group)
        if known is None:
            answer = await self._api.get(f"/apis/{group}")
            preferred = (answer or {}).get("preferredVersion") or {}
            known = str(preferred.get("version") or "")
            if not known:
                raise UnknownResource(f"the API serves no group {group!r}")
            self._preferred[group] = known
        return known

    async def _discover(self, group: str, version: str, *, refresh: bool) -> dict[str, bool]:
        key = (group, version)
        if not refresh and key in self._resources:
            return self._resources[key]
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        answer = await self._api.get(path)
        found: dict[str, bool] = {}
        for item in (answer or {}).get("resources") or []:
            name = item.get("name")
            if isinstance(name, str) and "/" not in name:
                found[name] = bool(item.get("namespaced"))
        if refresh:
            log.info("discovery of %s: %d resources", path, len(found))
        self._resources[key] = found
        return found
