"""The initial snapshot of a GitTarget, and the prune of files whose object is gone.

Every resource type the target's rules could select is listed (paginated, ``limit`` /
``continue``); each object the rules do select becomes its file, encoded as the pipeline
encodes it (sanitized; Secrets encrypted), all in one commit ``[SNAPSHOT] <path>``. A second
commit ``[PRUNE] <path>`` removes the files, in the folders the rules cover, whose object
no longer exists. Both are authored by the committer identity: no user made them.
:mod:`audit_reverser.cluster.resync` compares the same listing periodically, for all
targets at once (:func:`list_targets` lists each type once); :func:`settled_listings` is
the frame both use (watch the writers, list, settle, offer).

What events change while the listing is made is theirs (:meth:`Listing.settle`): a listing
never undoes a newer change. Files are kept as encoded bytes only, page by page: the listed
JSON is not held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from audit_reverser.cluster.api import ApiUnavailable, KubeApi
from audit_reverser.cluster.objects import ApiObjects, ApiResource
from audit_reverser.cluster.rules import ClusterRules
from audit_reverser.config.model import API_VERSION, Config, GitTarget, Key
from audit_reverser.errors import TemporaryError
from audit_reverser.events import ObjectRef
from audit_reverser.gitstore.types import FileChange, Identity, TreeChange
from audit_reverser.gitstore.writer import BranchWriter, Touched
from audit_reverser.pipeline.filter import EPHEMERAL_RESOURCES
from audit_reverser.pipeline.layout import InvalidName, object_path
from audit_reverser.pipeline.noise import controlled, is_own_secret, own_secrets
from audit_reverser.pipeline.processor import NOISE_RESOURCES, Encoded, Processor
from audit_reverser.pipeline.routing import Route, Router

log = logging.getLogger(__name__)

PAGE = 500
YIELD_EVERY = 10  # objects encoded between two turns of the event loop (about 5 ms)
_PROBE = "snapshot-probe"


@dataclass(frozen=True, kw_only=True, slots=True)
class SnapshotResult:
    files: int  # objects the rules select
    written: bool  # the snapshot commit changed something
    pruned: bool  # the prune commit removed files


@dataclass(frozen=True, kw_only=True, slots=True)
class Listing:
    """A target's objects in the cluster as the files they make (see :func:`list_target`)."""

    files: tuple[FileChange, ...]  # the objects the rules select
    versions: Mapping[str, str]  # file -> resourceVersion of its object
    keep: frozenset[str]  # the file of every object that exists, selected or not
    folders: tuple[str, ...]  # the folders the rules cover: their other files are stale
    left: int = 0  # files left to changes submitted while listing (see settle)

    def settle(self, touched: Touched, processor: Processor, writer: BranchWriter) -> Listing:
        """The listing without what may have changed since listing began, so that it never
        undoes a newer change: files a change submitted meanwhile touched, or that an event
        wrote at a newer resourceVersion, are neither written nor removed; folders such a
        change pruned are not compared. They are left to those changes (and the next run).
        """
        files = tuple(
            f
            for f in self.files
            if not touched.covers(f.path)
            and not processor.wrote_newer(writer, f.path, self.versions[f.path])
        )
        return Listing(
            files=files,
            versions={f.path: self.versions[f.path] for f in files},
            keep=self.keep | touched.files,
            folders=tuple(f for f in self.folders if not touched.overlaps(f)),
            left=self.left + len(self.files) - len(files),
        )


def _route(router: Router, ref: ObjectRef, target: GitTarget) -> Route | None:
    """The target's route for ``ref``, as the pipeline would take it (noise only by name)."""
    explicit_only = (ref.api_group, ref.resource) in NOISE_RESOURCES
    for route in router.routes(ref, "create", cluster=target.key.cluster):
        if route.target.key == target.key and (route.explicit or not explicit_only):
            return route
    return None


def _selects(router: Router, resource: ApiResource, namespace: str, target: GitTarget) -> bool:
    ref = ObjectRef(
        resource=resource.name,
        api_group=resource.group,
        api_version=resource.version,
        namespace=namespace,
        name=_PROBE,
    )
    return _route(router, ref, target) is not None


def _covered(router: Router, config: Config, resource: ApiResource, target: GitTarget) -> list[str]:
    """The folders of this type whose files the target's rules cover: the type's folder when
    it is cluster-scoped or a ClusterWatchRule selects it in any namespace, else the
    namespaces of the WatchRules that select it (none: the type is not listed)."""
    if (resource.group, resource.name) in EPHEMERAL_RESOURCES:
        return []
    parts = (target.path, target.cluster, resource.group, resource.version, resource.name)
    folder = "/".join(p for p in parts if p)
    if not resource.namespaced:
        return [folder] if _selects(router, resource, "", target) else []
    if _selects(router, resource, _PROBE, target):
        return [folder]
    namespaces = sorted({r.key.namespace for r in config.watch_rules})
    return [f"{folder}/{ns}" for ns in namespaces if _selects(router, resource, ns, target)]


async def list_target(
    *,
    api: KubeApi,
    objects: ApiObjects,
    config: Config,
    target: GitTarget,
    processor: Processor,
    committer: Identity,
    now: datetime,
) -> Listing:
    """Every object the target's rules select in the cluster now, encoded as the pipeline
    encodes it (sanitized, Secrets encrypted; generated objects and our own Secrets left
    out), with what else exists in the folders the rules cover."""
    listed = await list_targets(
        api=api,
        objects=objects,
        config=config,
        targets=[target],
        processor=processor,
        committer=committer,
        now=now,
    )
    return listed[target.key]


@dataclass(kw_only=True, slots=True)
class _Collected:
    files: list[FileChange] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    keep: set[str] = field(default_factory=set)
    folders: list[str] = field(default_factory=list)


async def list_targets(
    *,
    api: KubeApi,
    objects: ApiObjects,
    config: Config,
    targets: Sequence[GitTarget],
    processor: Processor,
    committer: Identity,
    now: datetime,
) -> dict[Key, Listing]:
    """:func:`list_target` for several targets at once: each resource is listed once, for
    every target whose rules cover it (several targets selecting the same resources make
    one LIST, not one each). A target carrying a cluster (``GitTarget.cluster``: a fleet
    with rules from files) is compared in that cluster's folder under its path."""
    router = Router(config)
    secrets = own_secrets(config)
    found = {target.key: _Collected() for target in targets}
    for resource in await objects.listable():
        covering = []
        for target in targets:
            covered = _covered(router, config, resource, target)
            if covered:
                found[target.key].folders.extend(covered)
                covering.append(target)
        if not covering:
            continue
        seen = 0
        async for item in _list(api, resource):
            seen += 1
            if seen % YIELD_EVERY == 0:  # encoding is CPU work: let requests in between
                await asyncio.sleep(0)
            metadata = item.get("metadata") or {}
            namespace = str(metadata.get("namespace") or "") if resource.namespaced else ""
            name = str(metadata.get("name") or "")
            ref = ObjectRef(
                resource=resource.name,
                api_group=resource.group,
                api_version=resource.version,
                namespace=namespace,
                name=name,
            )
            item.setdefault("apiVersion", resource.group_version)
            item.setdefault("kind", resource.kind)
            version = str(metadata.get("resourceVersion") or "")
            for target in covering:
                collected = found[target.key]
                try:
                    collected.keep.add(
                        object_path(
                            target_path=target.path,
                            cluster=target.cluster,
                            api_group=resource.group,
                            api_version=resource.version,
                            resource=resource.name,
                            namespace=namespace,
                            name=name,
                        ).file
                    )
                except InvalidName:
                    break
                route = _route(router, ref, target)
                if route is None or (not route.explicit and controlled(item)):
                    continue  # not selected, or generated from an owner that is in Git
                if is_own_secret(ref, secrets, target.key.cluster):
                    continue
                encoded = processor.encode(
                    target, ref, namespace, name, item, when=now, label=f"listed {name}"
                )
                if isinstance(encoded, Encoded) and encoded.content is not None:
                    collected.files.append(_file(encoded, committer, now))
                    collected.versions[encoded.path.file] = version
    return {
        key: Listing(
            files=tuple(c.files),
            versions={f.path: c.versions[f.path] for f in c.files},
            keep=frozenset(c.keep),
            folders=tuple(c.folders),
        )
        for key, c in found.items()
    }


@contextlib.asynccontextmanager
async def settled_listings(
    *,
    api: KubeApi,
    objects: ApiObjects,
    config: Config,
    targets: Sequence[tuple[GitTarget, BranchWriter]],
    processor: Processor,
    committer: Identity,
    now: datetime,
) -> AsyncIterator[dict[Key, Listing]]:
    """The targets' listings (:func:`list_targets`), settled against the changes submitted
    to their writers while listing (:meth:`Listing.settle`). The body offers its commits
    without awaiting anything, so that no change slips in between; afterwards, events older
    than what the listings wrote are stale."""
    with contextlib.ExitStack() as stack:
        touched = [stack.enter_context(writer.watching()) for _, writer in targets]
        listed = await list_targets(
            api=api,
            objects=objects,
            config=config,
            targets=[target for target, _ in targets],
            processor=processor,
            committer=committer,
            now=now,
        )
        settled = {
            target.key: listed[target.key].settle(seen, processor, writer)
            for (target, writer), seen in zip(targets, touched, strict=True)
        }
        yield settled
        for target, writer in targets:
            processor.remember_versions(writer, settled[target.key].versions)


async def snapshot(
    *,
    api: KubeApi,
    objects: ApiObjects,
    config: Config,
    target: GitTarget,
    processor: Processor,
    writer: BranchWriter,
    committer: Identity,
) -> SnapshotResult:
    """Write the target's snapshot and prune commits; returns what they did."""
    now = datetime.now(UTC)
    subject = target.path or "/"
    async with settled_listings(
        api=api,
        objects=objects,
        config=config,
        targets=[(target, writer)],
        processor=processor,
        committer=committer,
        now=now,
    ) as listings:
        listing = listings[target.key]
        stamp = f"Objects: {len(listing.files)}\nTarget: {target.key}"
        snapshot_done = writer.offer(
            TreeChange(
                files=listing.files,
                message=f"[SNAPSHOT] {subject}\n\n{stamp}\n",
                author=committer,
                time=now,
            )
        )
        prune_done = writer.offer(
            TreeChange(
                prune=listing.folders,
                keep=listing.keep,
                message=f"[PRUNE] {subject}\n\nTarget: {target.key}\n",
                author=committer,
                time=now,
            )
        )
    # Shielded: a snapshot cancelled at shut-down must not cancel the writer's futures.
    written = (await asyncio.shield(snapshot_done)).commit_id is not None
    pruned = (await asyncio.shield(prune_done)).commit_id is not None
    log.info(
        "snapshot of GitTarget %s: %d objects, %s, %s",
        target.key,
        len(listing.files),
        "committed" if written else "nothing new",
        "stale files pruned" if pruned else "nothing to prune",
    )
    return SnapshotResult(files=len(listing.files), written=written, pruned=pruned)


def _file(encoded: Encoded, committer: Identity, now: datetime) -> FileChange:
    return FileChange(
        path=encoded.path.file,
        content=encoded.content,
        message="",
        author=committer,
        time=now,
        also=encoded.also,
        fingerprint=encoded.fingerprint,
    )


async def _list(api: KubeApi, resource: ApiResource) -> AsyncIterator[dict[str, Any]]:
    """Every object of ``resource`` in the cluster, a page at a time."""
    token = ""
    while True:
        query = [("limit", str(PAGE))]
        if token:
            query.append(("continue", token))
        page = await api.get(resource.path, query)
        if page is None:
            return
        for item in page.get("items") or []:
            if isinstance(item, dict):
                yield item
        token = str((page.get("metadata") or {}).get("continue") or "")
        if not token:
            return


class SnapshotScheduler:
    """Snapshots every GitTarget once, when it first appears without one: its status has no
    ``snapshot.lastCompletedTime`` yet. Then records that time in its status, so that a
    restart does not snapshot again (``audit-reverser snapshot`` does, on demand)."""

    def __init__(
        self,
        api: KubeApi,
        rules: ClusterRules,
        run: Callable[[GitTarget], Awaitable[SnapshotResult | None]],
    ) -> None:
        self._api = api
        self._rules = rules
        self._run = run
        self._done: set[Key] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.config: Config | None = None

    def update(self, config: Config) -> None:
        self.config = config
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="snapshots")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            config = self.config
            if config is None:
                continue
            objects = self._rules.objects()
            for key, target in config.targets.items():
                obj = objects.get(("GitTarget", key.namespace, key.name), {})
                done = ((obj.get("status") or {}).get("snapshot") or {}).get("lastCompletedTime")
                if key in self._done or done:
                    continue
                self._done.add(key)
                try:
                    result = await self._run(target)
                except TemporaryError as exc:  # tried again after the next change
                    self._done.discard(key)
                    log.warning("snapshot of GitTarget %s: %s", key, exc)
                    continue
                if result is None:  # no usable provider yet: when it is, the target is new
                    self._done.discard(key)
                    continue
                stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                path = f"/apis/{API_VERSION}/namespaces/{key.namespace}/gittargets/{key.name}"
                with contextlib.suppress(ApiUnavailable):
                    await self._api.patch_status(path, {"snapshot": {"lastCompletedTime": stamp}})
