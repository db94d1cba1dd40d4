"""Rules from the cluster: the seed's custom resources, listed and watched.

Each kind is a :class:`Collection`, kept current by list + watch: a watch that ends is
started again from the last resourceVersion seen, one whose version expired (410 Gone) lists
again, and an API that does not answer is retried with capped back-off, all while the last
good rules stay in force. After each change (debounced) the config is built again, with the
Secrets the providers and targets reference read fresh, and handed on. A change of ``status``
alone (our own status reports) is no change of the rules: it rebuilds nothing. Broken objects are
logged and left out; the others keep working.

Flux's GitRepositories, which GitTargets may name as their provider, are watched the same
way, but optionally: without Flux (no such resource, or not allowed to list it) the rest
works, and the targets that name one are not ready, saying why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from audit_reverser.cluster.api import ApiUnavailable, KubeApi, WatchExpired
from audit_reverser.config.loader import build_config, usable_part
from audit_reverser.config.model import (
    API_VERSION,
    FLUX_GIT_REPOSITORY,
    FLUX_SOURCE_GROUP,
    Config,
    GitTarget,
)
from audit_reverser.encryption import age
from audit_reverser.encryption.keys import KEY_SUFFIX

log = logging.getLogger(__name__)

KINDS = {
    "GitProvider": "gitproviders",
    "GitTarget": "gittargets",
    "WatchRule": "watchrules",
    "ClusterWatchRule": "clusterwatchrules",
}
FLUX_PATH = f"/apis/{FLUX_SOURCE_GROUP}/v1/gitrepositories"
# How often to look whether Flux was installed, when it is not.
ABSENT_RETRY_S = 60.0
DEBOUNCE_S = 0.2
# Secrets are read at every rebuild, and at least this often (a rotated token, a new key).
REFRESH_S = 60.0
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0


class Collection:
    """The objects of one resource across the cluster, kept current by list + watch."""

    def __init__(self, api: KubeApi, kind: str, path: str, *, optional: bool = False) -> None:
        self._api = api
        self.kind = kind
        self.path = path
        # Optional (another project's resource): one that cannot be listed counts as empty,
        # and ``unavailable`` says why, instead of holding the start-up.
        self.optional = optional
        self.unavailable: str | None = None
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.synced = asyncio.Event()
        # Set once the first list answered or failed; ``failure``: why it has not been listed.
        self.tried = asyncio.Event()
        self.failure: str | None = None
        self.relists = 0

    async def run(self, changed: Callable[[], None]) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                version = await self._list()
                if version is None:  # optional, and not served (yet): look again later
                    self._absent(f"the API serves no {self.path} (is Flux installed?)", changed)
                    await asyncio.sleep(ABSENT_RETRY_S)
                    continue
                self.synced.set()
                self.tried.set()
                self.failure = None
                changed()
                while True:  # a watch ends at the server's timeout: go on from where it was
                    async for event in self._api.watch(self.path, version):
                        before = self._meaning(event)
                        version = self._apply(event) or version
                        if event.get("type") != "BOOKMARK" and before != self._meaning(event):
                            changed()
                    delay = RETRY_MIN_S
            except WatchExpired:
                self.relists += 1
                log.info("watch of %s expired (410 Gone); listing again", self.path)
            except ApiUnavailable as exc:
                if self.optional and not self.synced.is_set():
                    self._absent(str(exc), changed)
                if not self.synced.is_set():
                    self.failure = str(exc)
                self.tried.set()
                log.warning(
                    "%s: %s; keeping the last rules, next try in %.1fs", self.kind, exc, delay
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RETRY_MAX_S)

    def _absent(self, why: str, changed: Callable[[], None]) -> None:
        """An optional resource that cannot be listed: no objects (said once)."""
        if self.unavailable is None:
            log.info("%s: %s; GitTargets that name one are not ready", self.kind, why)
            self.unavailable = why
            self.items = {}
            changed()
        self.synced.set()
        self.tried.set()

    async def _list(self) -> str | None:
        """The objects, and the resourceVersion to watch from; None when an optional
        resource is not served."""
        answer = await self._api.get(self.path)
        if answer is None and self.optional:
            return None
        if answer is None:
            raise ApiUnavailable(
                f"the API serves no {self.path}: apply the CRDs "
                "(kubectl apply -f deploy/base/crds/)"
            )
        if self.unavailable is not None:
            log.info("%s: listed again after: %s", self.kind, self.unavailable)
            self.unavailable = None
        items = answer.get("items") or []
        self.items = {_key(item): item for item in items if isinstance(item, dict)}
        metadata = answer.get("metadata") or {}
        return str(metadata.get("resourceVersion") or "")

    def _meaning(self, event: Mapping[str, Any]) -> object:
        """What the rules are built from, of the object ``event`` is about, as held now:
        everything but its status and the server's bookkeeping."""
        obj = event.get("object")
        held = self.items.get(_key(obj)) if isinstance(obj, dict) else None
        if held is None:
            return None
        metadata = {
            k: v
            for k, v in (held.get("metadata") or {}).items()
            if k not in ("resourceVersion", "managedFields")
        }
        return {**{k: v for k, v in held.items() if k != "status"}, "metadata": metadata}

    def _apply(self, event: Mapping[str, Any]) -> str:
        obj = event.get("object")
        if not isinstance(obj, dict):
            return ""
        kind = event.get("type")
        if kind in ("ADDED", "MODIFIED"):
            self.items[_key(obj)] = obj
        elif kind == "DELETED":
            self.items.pop(_key(obj), None)
        return str((obj.get("metadata") or {}).get("resourceVersion") or "")


ObjectId = tuple[str, str, str]  # kind, namespace ('' when cluster-scoped), name
# "Cluster NAME": a fleet's cluster whose rules could not be read (cluster.fleet).
_OWNER = re.compile(r"^(GitProvider|GitTarget|WatchRule|ClusterWatchRule|Cluster) ([^\s:(]+)")


def owner_of(problem: str) -> ObjectId | None:
    """The object a problem from :func:`build_config` is about (its text starts with it)."""
    match = _OWNER.match(problem)
    if match is None:
        return None
    namespace, _, name = match[2].rpartition("/")
    return match[1], namespace, name


AGE_RECIPIENT = "configbutler.ai/age-recipient"
BACKUP_WARNING = "configbutler.ai/backup-warning"
BACKUP_PENDING = "REMOVE_AFTER_BACKUP"


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


class ClusterRules:
    """The config the cluster's custom resources describe, rebuilt as they change."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api
        group, version = API_VERSION.split("/")
        self.collections = [
            Collection(api, kind, f"/apis/{group}/{version}/{plural}")
            for kind, plural in KINDS.items()
        ]
        # Read, never reported on: Flux's own resource, kept apart from ``collections``.
        self.flux = Collection(api, FLUX_GIT_REPOSITORY, FLUX_PATH, optional=True)
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._problems: list[str] = []
        self.problems: dict[ObjectId, str] = {}  # the first problem of each broken object
        self.on_change: Callable[[Config], Awaitable[None]] | None = None
        self.rebuilds = 0
        self._generated: dict[tuple[str, str], age.Identity] = {}
        # Whether this replica makes the keys generateWhenMissing asks for: with several
        # replicas (serve --journal), only the writer does, so that two never make two.
        self.generates_keys: Callable[[], bool] = lambda: True

    def rebuild(self) -> None:
        """Build the rules again soon (this replica now makes keys: some may be missing)."""
        self._dirty.set()

    def objects(self) -> dict[ObjectId, dict[str, Any]]:
        """Every custom resource as last seen (the watched objects themselves)."""
        return {
            (collection.kind, namespace, name): obj
            for collection in self.collections
            for (namespace, name), obj in collection.items.items()
        }

    async def start(self, timeout_s: float = 60.0) -> Config:
        """Start watching; the first config, once every kind has been listed."""
        self.watch()
        try:
            async with asyncio.timeout(timeout_s):
                return await self.listed()
        except TimeoutError:
            await self.close()
            raise ApiUnavailable(
                f"could not list the configbutler.ai resources within {timeout_s:.0f}s"
            ) from None

    def watch(self) -> None:
        """Start listing and watching every kind (an API that does not answer is retried)."""
        for collection in [*self.collections, self.flux]:
            self._tasks.append(
                asyncio.create_task(
                    collection.run(self._dirty.set), name=f"watch {collection.kind}"
                )
            )

    async def tried(self) -> None:
        """Wait until every kind has been listed, or one could not be (see :attr:`away`)."""
        watched = [*self.collections, self.flux]
        waits = [asyncio.ensure_future(c.tried.wait()) for c in watched]
        try:
            while waits and self.away is None:
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                waits = list(pending)
        finally:
            for wait in waits:
                wait.cancel()

    @property
    def away(self) -> str | None:
        """Why the rules have not been read yet (a kind the API did not list), or None."""
        unlisted = (c.failure for c in self.collections if not c.synced.is_set())
        return next((failure for failure in unlisted if failure), None)

    async def listed(self) -> Config:
        """The first config, once every kind has been listed (after :meth:`watch`); the
        config is rebuilt as the objects change from then on."""
        await asyncio.gather(*(c.synced.wait() for c in [*self.collections, self.flux]))
        config = await self._build()
        self._dirty.clear()
        self._tasks.append(asyncio.create_task(self._rebuild_loop(), name="cluster rules"))
        return config

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _rebuild_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_S):
                    await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE_S)  # a burst of changes, one rebuild
            if self.on_change is None:  # nobody to hand it to yet: keep it pending
                self._dirty.set()
                continue
            self._dirty.clear()
            try:
                config = await self._build()
            except ApiUnavailable as exc:
                log.warning("rules not rebuilt: %s; the last ones stay in force", exc)
                continue
            if self.on_change is not None:
                try:
                    await self.on_change(config)
                except Exception:  # the watch must go on; the next change tries again
                    log.exception("applying the changed rules failed")

    async def _generate_key(
        self, target: GitTarget, secrets: dict[tuple[str, str], dict[str, Any] | None]
    ) -> None:
        """generateWhenMissing, in the cluster: a date-named ``*.agekey`` entry written into
        the encryption Secret (made when missing), annotated with its recipient and the
        backup warning. The same key is offered again until the write succeeds."""
        encryption = target.encryption
        if (
            encryption is None
            or not self.generates_keys()
            or not encryption.age_enabled
            or not encryption.recipients.generate_when_missing
            or not encryption.secret_name
        ):
            return
        where = (target.key.namespace, encryption.secret_name)
        secret = secrets.get(where)
        data = (secret or {}).get("data") or {}
        if any(name.endswith(KEY_SUFFIX) for name in data):
            return
        identity = self._generated.setdefault(where, age.Identity.generate())
        now = datetime.now(UTC)
        entry = f"{now:%Y-%m-%d}{KEY_SUFFIX}"
        key_file = identity.key_file(now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        annotations = {AGE_RECIPIENT: identity.recipient, BACKUP_WARNING: BACKUP_PENDING}
        encoded = {entry: base64.b64encode(key_file.encode()).decode()}
        namespace, name = where
        collection = f"/api/v1/namespaces/{namespace}/secrets"
        if secret is None:
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
                "data": encoded,
            }
            written = await self._api.write("POST", collection, body)
        else:
            patch = {"metadata": {"annotations": annotations}, "data": encoded}
            written = await self._api.write("PATCH", f"{collection}/{name}", patch)
        if not written:
            return  # changed under us: the next rebuild reads it again
        log.warning(
            "GitTarget %s: generated the age key %s in Secret %s/%s (recipient %s). BACK IT UP "
            "NOW: without it nobody can decrypt the Secrets in Git.",
            target.key,
            entry,
            namespace,
            name,
            identity.recipient,
        )
        secrets[where] = await self._api.get(f"{collection}/{name}")

    def _why_no_git_repository(self, problem: str, problems: list[str]) -> str:
        """A GitTarget's 'GitRepository NS/NAME not found', with why: Flux is not there, or
        the GitRepository is, but broken (its own problem; it gets no status of ours)."""
        missing = re.search(rf"{FLUX_GIT_REPOSITORY} (\S+) not found$", problem)
        if not problem.startswith("GitTarget ") or missing is None:
            return problem
        if self.flux.unavailable is not None:
            return f"{problem} ({self.flux.unavailable})"
        own = f"{FLUX_GIT_REPOSITORY} {missing[1]} ("
        broken = next((p for p in problems if p.startswith(own)), None)
        return f"{problem}: it cannot be used: {broken}" if broken else problem

    async def _build(self) -> Config:
        documents: list[tuple[str, Mapping[str, Any]]] = []
        for collection in [*self.collections, self.flux]:
            for (namespace, name), obj in sorted(collection.items.items()):
                label = f"{namespace}/{name}" if namespace else name
                documents.append((f"{collection.kind} {label}", obj))
        first, _ = build_config(documents)
        wanted = {
            (provider.key.namespace, provider.secret_name)
            for provider in first.providers.values()
            if provider.secret_name
        } | {
            (target.key.namespace, target.encryption.secret_name)
            for target in first.targets.values()
            if target.encryption is not None and target.encryption.secret_name
        }
        secrets: dict[tuple[str, str], dict[str, Any] | None] = {}
        for namespace, name in sorted(wanted):
            secrets[namespace, name] = await self._api.get(
                f"/api/v1/namespaces/{namespace}/secrets/{name}"
            )
        for target in first.targets.values():
            await self._generate_key(target, secrets)
        for (namespace, name), secret in secrets.items():
            if secret is None:
                continue
            documents.append(
                (f"Secret {namespace}/{name}", {**secret, "kind": "Secret", "apiVersion": "v1"})
            )
            annotations = (secret.get("metadata") or {}).get("annotations") or {}
            if annotations.get(BACKUP_WARNING) == BACKUP_PENDING:
                log.warning(
                    "BACK UP the age key in Secret %s/%s: without it nobody can decrypt the "
                    "Secrets in Git. Then: kubectl annotate secret %s -n %s %s-",
                    namespace,
                    name,
                    name,
                    namespace,
                    BACKUP_WARNING,
                )
        config, problems = build_config(documents, sources=(self._api.server,))
        problems = [self._why_no_git_repository(p, problems) for p in problems]
        if problems != self._problems:
            for problem in problems:
                log.error("cluster rules: %s", problem)
            self._problems = problems
        owners: dict[ObjectId, str] = {}
        for problem in problems:
            owner = owner_of(problem)
            if owner is not None:
                owners.setdefault(owner, problem)
        self.problems = owners
        self.rebuilds += 1
        return usable_part(config)
