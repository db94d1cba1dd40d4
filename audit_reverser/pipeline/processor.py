"""From one kept audit event to file changes on the right branch writers.

Route (rules → targets), resolve (event → object states), sanitize, lay out, and submit a
:class:`FileChange` per object and target. The processor keeps the memories the event
semantics need: auditIDs already handled (one commit per event even when the apiserver
sends it twice), the newest resourceVersion written per file (an older event never
regresses a file), and who asked for the deletions that others finish
(:mod:`audit_reverser.pipeline.deletions`).

Control-plane writes, excluded tools and ``status``/``finalize`` subresource writes are no
commits of their own, except the write that makes a selected object disappear: that is a
``[DELETE]`` in the name of whoever asked for the deletion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from audit_reverser.config.model import Config, GitTarget, Key
from audit_reverser.context import about
from audit_reverser.encryption import sops
from audit_reverser.encryption.keys import TargetKeys
from audit_reverser.encryption.keys import fingerprint as fingerprint_of
from audit_reverser.errors import TemporaryError
from audit_reverser.events import AuditEvent, EventKey, ObjectRef
from audit_reverser.gitstore.types import CommitOutcome, FileChange, TreeChange
from audit_reverser.pipeline import canonical
from audit_reverser.pipeline.commits import Action, author_for, commit_message, trailer
from audit_reverser.pipeline.deletions import DELETE_VERBS, Deletions, Request
from audit_reverser.pipeline.filter import Skip
from audit_reverser.pipeline.home import HomeCluster
from audit_reverser.pipeline.layout import (
    CRDS,
    InvalidName,
    ObjectPath,
    check_reference,
    contents_patterns,
    is_secret,
    object_path,
)
from audit_reverser.pipeline.noise import (
    NO_EXCLUSIONS,
    Exclusions,
    controlled,
    is_own_secret,
    own_secrets,
)
from audit_reverser.pipeline.resolve import (
    BOOKKEEPING_SUBRESOURCES,
    NeedsApi,
    ObjectChange,
    ObjectSource,
    UnknownResource,
    is_gone,
    resolve_from_api,
    resolve_offline,
)
from audit_reverser.pipeline.routing import Route, Router, is_cluster_scoped
from audit_reverser.pipeline.sanitize import sanitize
from audit_reverser.pipeline.stats import PipelineStats

log = logging.getLogger(__name__)

# Selected only by rules that name them: a wildcard rule would otherwise commit every
# heartbeat and controller bookkeeping write in the cluster.
NOISE_RESOURCES = frozenset(
    {
        ("", "events"),
        ("events.k8s.io", "events"),
        ("coordination.k8s.io", "leases"),
        ("", "endpoints"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "componentstatuses"),
        ("apps", "controllerrevisions"),
    }
)

DEDUP_WINDOW = 100_000
# Files whose newest resourceVersion is kept in memory (about 320 bytes each: 16 MB), the
# most recently written ones. An event for a file written longer ago that is not newer than
# every version forgotten is checked against the Resource-Version of the file's last commit
# instead (a walk back through the history, on the Git thread). Before this bound, one entry
# per file ever written stayed for the life of the process.
VERSION_WINDOW = 50_000
# Events one read answers at most (their users become Co-authored-by trailers).
FOLD_LIMIT = 50

# An event without any timestamp (only hand-made fixtures lack them) is dated at the epoch,
# visibly "unknown", rather than at the wall clock, which would break byte-identical replays.
UNKNOWN_TIME = datetime(1970, 1, 1, tzinfo=UTC)


class RulesNotRead(TemporaryError):
    """The event's cluster is one of a fleet whose rules are not read yet: it is held (in
    the journal) rather than routed by rules that are not known."""


class CommitSink(Protocol):
    async def submit(self, change: FileChange | TreeChange) -> asyncio.Future[CommitOutcome]: ...

    async def last_message(self, path: str) -> str | None: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Encoded:
    """One object as a file of a target (see :meth:`Processor.encode`)."""

    path: ObjectPath
    content: bytes | None
    fingerprint: str | None
    also: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Routed:
    """An event's targets as :meth:`Processor.routes` found them on arrival. Processing
    reuses them while the rules are the same (``generation``), instead of routing the event
    a second time; None when they depend on what happens in between (a deletion)."""

    routes: tuple[Route, ...]
    generation: int | None


def _rv_number(rv: str) -> int | None:
    # resourceVersion is opaque by contract, but every apiserver backed by etcd writes the
    # etcd revision as decimal; only such values are compared.
    return int(rv) if rv.isdecimal() else None


class Processor:
    def __init__(
        self,
        config: Config,
        sinks: Mapping[Key, CommitSink],
        stats: PipelineStats,
        *,
        keys: Mapping[Key, TargetKeys] | None = None,
        fingerprint_key: bytes = b"",
        source: ObjectSource | None = None,
        sources: Mapping[str, ObjectSource] | None = None,
        home: HomeCluster | None = None,
        exclusions: Exclusions = NO_EXCLUSIONS,
    ) -> None:
        self._home = home
        self._router = Router(config, home)
        self._own_secrets = own_secrets(config)
        self._sinks = sinks
        self._generation = 0  # of the rules and targets, for Routed
        self.stats = stats
        self._keys = keys or {}
        self._fingerprint_key = fingerprint_key
        self._source = source
        # A fleet (serve --cluster): each cluster's API by name; never another cluster's.
        self._sources = sources
        self._strangers: set[str] = set()  # other clusters' names, warned about once
        self._by_cluster = config.by_cluster
        self._waiting = config.waiting
        self._exclusions = exclusions
        self._refused_secrets: set[Key] = set()
        self._rules: dict[tuple[str, ...], bytes] = {}  # .sops.yaml per set of recipients
        self._handled: OrderedDict[EventKey, None] = OrderedDict()
        self._versions: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._forgotten = -1  # the newest version dropped from _versions
        self._deletions = Deletions()
        # Events whose change a commit made for an earlier event holds (one read answered
        # both): their own turn returns that commit, so their journal records wait for it.
        self._folded: OrderedDict[EventKey, list[asyncio.Future[CommitOutcome]]] = OrderedDict()

    def reconfigure(
        self, config: Config, sinks: Mapping[Key, CommitSink], keys: Mapping[Key, TargetKeys]
    ) -> None:
        """New rules, targets and keys; the next event is routed by them."""
        self._router = Router(config, self._home)
        self._by_cluster = config.by_cluster
        self._waiting = config.waiting
        self._own_secrets = own_secrets(config)
        self._sinks = sinks
        self._generation += 1
        self._keys = keys
        self._refused_secrets.clear()

    def remember(self, keys: Iterable[EventKey]) -> None:
        """Events an earlier run handled: the same event sent again makes no commit."""
        for key in keys:
            self._remember(key)

    def forget(self, key: EventKey) -> None:
        """An event whose commit failed: it is processed again, not skipped as handled."""
        self._handled.pop(key, None)
        self._folded.pop(key, None)

    def recall_versions(self, sink: CommitSink, commits: Iterable[tuple[str, str]]) -> None:
        """Newest resourceVersions of files committed by ``(path, message)`` before a crash,
        so that events processed again never regress a file a later event already wrote."""
        for path, message in commits:
            version = _rv_number(trailer(message, "Resource-Version") or "")
            if version is not None:
                self._keep_version((id(sink), path), version)

    def wrote_newer(self, sink: CommitSink, path: str, resource_version: str) -> bool:
        """Whether an event wrote ``path`` through ``sink`` at a newer resourceVersion.
        A file not written among the last VERSION_WINDOW is not: the API's state is newer."""
        version = _rv_number(resource_version)
        stored = self._versions.get((id(sink), path))
        return version is not None and stored is not None and stored > version

    def remember_versions(self, sink: CommitSink, versions: Mapping[str, str]) -> None:
        """Files written from the API (a resync) at these resourceVersions: from now on an
        event older than them is stale, as if an event had written them."""
        for path, resource_version in versions.items():
            version = _rv_number(resource_version)
            if version is not None:
                self._keep_version((id(sink), path), version)

    def _keep_version(self, key: tuple[int, str], version: int) -> None:
        """Remember the file's version unless a newer one is; forget the least recently
        written file beyond VERSION_WINDOW."""
        versions = self._versions
        if version < versions.get(key, -1):
            return
        versions[key] = version
        versions.move_to_end(key)
        if len(versions) > VERSION_WINDOW:
            _, dropped = versions.popitem(last=False)
            self._forgotten = max(self._forgotten, dropped)

    async def _stored_version(self, sink: CommitSink, path: str, version: int) -> int | None:
        """The newest version written to ``path``, as far as it matters for ``version``."""
        stored = self._versions.get((id(sink), path))
        if stored is not None or version > self._forgotten:
            return stored  # not forgotten, or newer than anything forgotten
        message = await sink.last_message(path)
        return _rv_number(trailer(message, "Resource-Version") or "") if message else None

    @property
    def deletions(self) -> Deletions:
        """Who asked for the deletions pending (saved across restarts by the runtime)."""
        return self._deletions

    def routes(self, event: AuditEvent) -> Routed | Skip:
        """Targets for the event, or why it goes nowhere. Cheap: no object is touched."""
        with about(audit_id=event.audit_id):
            found = self._routes(event)
            if isinstance(found, Skip):
                return found
            routes, noise = found
            # A delete request is remembered when routed, and whether noise, or a write
            # whose object must be read, finishes a deletion depends on the requests before
            # it (see _verbs): those are routed again.
            settled = (
                noise is None
                and event.verb not in DELETE_VERBS
                and event.response_object is not None
            )
            return Routed(routes=tuple(routes), generation=self._generation if settled else None)

    def may_finish_deletion(self, raw: Mapping[str, Any], *, cluster: str = "") -> bool:
        """For a ``status`` write the cheap filter would drop: whether it may be the one that
        makes an object disappear (its response shows the deletion done, or the deletion of
        its object was asked for). Looks only at the decoded JSON, as the filter does."""
        response = raw.get("responseObject")
        if isinstance(response, Mapping):
            return is_gone(response)
        ref = raw.get("objectRef")
        if not isinstance(ref, Mapping):
            return False
        parts = [ref.get(k) or "" for k in ("resource", "apiGroup", "namespace", "name")]
        if not all(isinstance(p, str) for p in parts):
            return False
        resource, group, namespace, name = parts
        return self._deletions.pending_object(cluster, group, resource, namespace, name)

    def _noise(self, event: AuditEvent) -> Skip | None:
        """Why the event is no commit of its own (it may still finish a deletion), or None."""
        ref = event.object_ref
        if ref is not None and ref.subresource in BOOKKEEPING_SUBRESOURCES:
            return Skip.STATUS
        if self._exclusions.excluded_user(event):
            return Skip.EXCLUDED_USER
        if self._exclusions.excluded_field_manager(event):
            return Skip.EXCLUDED_FIELD_MANAGER
        return None

    def _may_finish_deletion(self, event: AuditEvent) -> bool:
        if event.verb in DELETE_VERBS:
            return True
        body, ref = event.response_object, event.object_ref
        if body is None:
            return self._deletions.pending(event)
        return (
            ref is not None
            and (not ref.subresource or ref.subresource in BOOKKEEPING_SUBRESOURCES)
            and is_gone(body)
        )

    def _verbs(self, event: AuditEvent) -> tuple[str, ...]:
        """The verbs an event is routed by: a write that finishes a deletion goes where the
        delete it completes goes (a rule that selects only DELETE takes it); one whose object
        must be read first, where either goes (see :meth:`_for_change`)."""
        if event.verb in DELETE_VERBS:
            return (event.verb,)
        if event.response_object is not None:
            return ("delete",) if self._may_finish_deletion(event) else (event.verb,)
        return (event.verb, "delete") if self._deletions.pending(event) else (event.verb,)

    def _routed(
        self,
        ref: ObjectRef,
        verbs: tuple[str, ...],
        event: AuditEvent | None = None,
        *,
        cluster: str = "",
    ) -> list[Route]:
        if len(verbs) == 1:
            return self._router.routes(ref, verbs[0], event, cluster=cluster)
        found: dict[Key, Route] = {}
        for verb in verbs:
            for route in self._router.routes(ref, verb, event, cluster=cluster):
                known = found.get(route.target.key)
                if known is None or (route.explicit and not known.explicit):
                    found[route.target.key] = route
        return list(found.values())

    def _for_change(
        self, event: AuditEvent, verbs: tuple[str, ...], routes: list[Route], change: ObjectChange
    ) -> list[Route]:
        """Of an event routed by two verbs, the routes of what it turned out to do."""
        ref = event.object_ref
        if len(verbs) < 2 or ref is None:
            return routes
        parent = dataclasses.replace(ref, subresource="")
        done = self._router.routes(parent, "delete" if change.body is None else event.verb)
        keys = {route.target.key for route in done}
        return [route for route in routes if route.target.key in keys]

    def _routes(self, event: AuditEvent) -> tuple[list[Route], Skip | None] | Skip:
        """Targets for the event and, when it counts only if it finishes a deletion, why it
        would be skipped otherwise."""
        ref = event.object_ref
        if ref is None:
            return Skip.NO_OBJECT
        noise = self._noise(event)
        self._deletions.asked(event, person=noise is None)
        if ref.subresource in BOOKKEEPING_SUBRESOURCES:
            ref = dataclasses.replace(ref, subresource="")  # routed as its parent object
        verbs = self._verbs(event)
        routes = self._routed(ref, verbs, event)
        # A CRD's deletion takes its instances from every target, selected or not.
        takes_instances = (ref.api_group, ref.resource) == CRDS and "delete" in verbs
        if not routes:
            routes = self._routed(ref, verbs, cluster=event.cluster)
            if routes:
                # A rule that selected it but excludes its user or tool says more than no-rule.
                noise = noise if noise is Skip.STATUS else Skip.EXCLUDED_BY_RULE
            elif takes_instances:
                noise = noise or Skip.NO_RULE  # it counts only if it finishes the deletion
            else:
                self._stranger_in_fleet(event.cluster)
                return Skip.NO_RULE
        if (ref.api_group, ref.resource) in NOISE_RESOURCES:
            routes = [r for r in routes if r.explicit]
            if not routes:
                return Skip.NOISE
        if is_own_secret(ref, self._own_secrets, event.cluster if self._by_cluster else ""):
            return Skip.OWN_SECRET
        # A target whose provider cannot be used (rules from a cluster) has no writer.
        routes = [r for r in routes if r.target.key in self._sinks]
        if not routes and not takes_instances:
            return Skip.TARGET_NOT_READY
        if noise is not None and not self._may_finish_deletion(event):
            return noise
        try:  # refuse forged references before they are journaled
            check_reference(
                api_group=ref.api_group,
                api_version=ref.api_version,
                resource=ref.resource,
                namespace=ref.namespace,
                name=ref.name,
            )
        except InvalidName as exc:
            log.warning("event %s refused: %s", event.audit_id, exc)
            return Skip.INVALID_NAME
        return routes, noise

    async def process(
        self, event: AuditEvent, later: Sequence[AuditEvent] = (), routed: Routed | None = None
    ) -> list[asyncio.Future[CommitOutcome]]:
        """Submit the event's changes; the futures resolve when each is committed locally.

        ``later``: events for the same object queued after this one. When the object is read
        from the API, the state read holds their changes too: one commit, by the latest.
        ``routed``: what :meth:`routes` said on arrival, reused while it still holds."""
        with about(audit_id=event.audit_id):
            return await self._process(event, later, routed)

    async def _process(
        self, event: AuditEvent, later: Sequence[AuditEvent], routed: Routed | None
    ) -> list[asyncio.Future[CommitOutcome]]:
        why = self._waiting.get(event.cluster)
        if why is not None:  # an event the last run took: it waits for its rules
            raise RulesNotRead(why)
        found: tuple[list[Route], Skip | None] | Skip
        if routed is not None and routed.generation == self._generation:
            found = list(routed.routes), None
        else:
            found = self._routes(event)
        if isinstance(found, Skip):
            return self._skip(event, found)
        routes, noise = found
        if event.key in self._handled:
            folded = self._folded.pop(event.key, None)
            if folded is not None:
                self.stats.skip(Skip.COALESCED)
                return folded
            return self._skip(event, Skip.DUPLICATE)
        events = [event]
        try:
            changes = resolve_offline(event)
        except NeedsApi as exc:
            if event.verb == "deletecollection" and self._source_for(event) is not None:
                return await self._delete_collection(event, routes)
            read = await self._read_from_api(event, exc)
            if isinstance(read, Skip):
                return self._skip(event, read)
            changes = read
            if noise is None and event.verb not in DELETE_VERBS:
                events += self._followers(routes, later)
        if noise is not None:  # only a deletion it finished counts
            changes = [change for change in changes if change.body is None]
            if not changes:
                return self._skip(event, noise)

        for each in events:
            self._remember(each.key)
        # The state read is the latest writer's: the commit is theirs (by time, then order).
        ordered = sorted(events, key=lambda e: e.time or UNKNOWN_TIME)
        author, earlier = ordered[-1], ordered[:-1]
        futures: list[asyncio.Future[CommitOutcome]] = []
        last_reason = Skip.UNCHANGED
        verbs = self._verbs(event) if event.response_object is None else ()
        for change in changes:
            requested = self._requester(event, change)
            chosen = self._for_change(event, verbs, routes, change)
            self._deletions.seen(event, change.namespace, change.name, change.body)
            if not chosen:
                last_reason = Skip.NO_RULE
            for route in chosen:
                if not route.explicit and controlled(change.body):
                    last_reason = Skip.CONTROLLED  # generated from its owner, which is in Git
                    continue
                outcome = await self._submit(
                    author, route.target, change, requested=requested, earlier=earlier
                )
                if isinstance(outcome, Skip):
                    last_reason = outcome
                else:
                    futures.append(outcome)
                    self.stats.kept_by_target[str(route.target.key)] += 1
            ref = event.object_ref
            if change.body is None and ref and (ref.api_group, ref.resource) == CRDS:
                futures += await self._prune_instances(author, chosen, change, requested)
        if futures:
            self.stats.kept += 1
        else:
            self.stats.skip(last_reason)
        for each in events[1:]:
            self._folded[each.key] = futures
            if len(self._folded) > DEDUP_WINDOW:
                self._folded.popitem(last=False)
        return futures

    def _followers(self, routes: list[Route], later: Sequence[AuditEvent]) -> list[AuditEvent]:
        """The queued events of the same object whose change a read made now also shows:
        writes that need the API, routed alike, up to the object's next deletion."""
        targets = {route.target.key for route in routes}
        found: list[AuditEvent] = []
        for other in later[:FOLD_LIMIT]:
            if other.verb in DELETE_VERBS:
                break
            if other.key in self._handled:
                continue
            try:
                resolve_offline(other)
                continue  # it carries its own object
            except NeedsApi:
                pass
            theirs = self._routes(other)
            if isinstance(theirs, Skip) or theirs[1] is not None:
                continue
            if {route.target.key for route in theirs[0]} == targets:
                found.append(other)
        return found

    async def _prune_instances(
        self,
        event: AuditEvent,
        routes: list[Route],
        change: ObjectChange,
        requested: Request | None,
    ) -> list[asyncio.Future[CommitOutcome]]:
        """A CRD gone: its instances' files go from the targets its rules do not select too
        (a target may select the custom resources and not their definition)."""
        routed = {route.target.key for route in routes}
        futures = []
        for target in self._router.every_target(event):
            if target.key in routed or target.key not in self._sinks:
                continue
            outcome = await self._submit(event, target, change, requested=requested)
            if not isinstance(outcome, Skip):
                futures.append(outcome)
        return futures

    def _requester(self, event: AuditEvent, change: ObjectChange) -> Request | None:
        """Who asked for the deletion ``event`` finished, when that is someone else."""
        if change.body is not None:
            return None
        requested = self._deletions.requester(event, change.namespace, change.name)
        if requested is None or requested.user.username == event.effective_user.username:
            return None
        return requested

    def encode(
        self,
        target: GitTarget,
        ref: ObjectRef,
        namespace: str,
        name: str,
        body: Mapping[str, Any] | None,
        *,
        when: datetime,
        label: str,
    ) -> Encoded | Skip:
        """The file of one object for ``target``: its path and sanitized (for a Secret,
        encrypted) content, None when the object is gone. ``label`` names the cause in logs."""
        with about(target=str(target.key)):
            secret = is_secret(ref.api_group, ref.resource)
            keys = self._keys.get(target.key) or TargetKeys(
                problem=f"GitTarget {target.key} has no spec.encryption"
            )
            if secret and keys.problem is not None and body is not None:
                if target.key not in self._refused_secrets:  # once, not once per Secret
                    self._refused_secrets.add(target.key)
                    log.warning("Secrets are not written, never in plaintext: %s", keys.problem)
                return Skip.SECRET
            try:
                path = object_path(
                    target_path=target.path,
                    cluster=target.cluster,
                    api_group=ref.api_group,
                    api_version=ref.api_version,
                    resource=ref.resource,
                    namespace="" if is_cluster_scoped(ref) else namespace,
                    name=name,
                )
            except InvalidName as exc:
                log.warning("%s refused: %s", label, exc)
                return Skip.INVALID_NAME
            fingerprint = None
            content = None
            if body is not None:
                try:
                    clean = sanitize(body, api_group=ref.api_group, resource=ref.resource)
                    content = canonical.dump(clean)
                    if secret:
                        fingerprint = fingerprint_of(
                            self._fingerprint_key, keys.recipients, content
                        )
                        encrypted, metadata = sops.encrypt(
                            canonical.ordered(clean), keys.recipients, now=when
                        )
                        content = canonical.dump(encrypted, trailer={"sops": metadata})
                except RecursionError:  # only forged objects nest this deep
                    log.warning("%s refused: the object is nested too deeply", label)
                    return Skip.MALFORMED
                except sops.SopsError as exc:
                    log.warning("%s refused: %s", label, exc)
                    return Skip.MALFORMED
            # The folder's .sops.yaml rides along with every commit until it is right.
            also = () if keys.problem else ((path.sops_config, self._creation_rules(keys)),)
            return Encoded(path=path, content=content, fingerprint=fingerprint, also=also)

    async def _submit(
        self,
        event: AuditEvent,
        target: GitTarget,
        change: ObjectChange,
        *,
        requested: Request | None = None,
        earlier: Sequence[AuditEvent] = (),
    ) -> asyncio.Future[CommitOutcome] | Skip:
        ref = event.object_ref
        assert ref is not None
        when = event.time or UNKNOWN_TIME
        encoded = self.encode(
            target,
            ref,
            change.namespace,
            change.name,
            change.body,
            when=when,
            label=f"event {event.audit_id}",
        )
        if isinstance(encoded, Skip):
            return encoded
        path = encoded.path
        sink = self._sinks[target.key]
        version = _rv_number(change.resource_version)
        stored = None if version is None else await self._stored_version(sink, path.file, version)
        if version is not None and stored is not None and version < stored:
            log.info(
                "event %s: %s is already at resourceVersion %d, newer than %d",
                event.audit_id,
                path.file,
                stored,
                version,
            )
            return Skip.STALE
        action: Action
        if change.body is None:
            action = "DELETE"
        elif any(e.verb == "create" for e in (*earlier, event)):
            action = "CREATE"
        else:
            action = "UPDATE"
        if version is not None:
            self._keep_version((id(sink), path.file), version)
        message = commit_message(
            action=action,
            subject_path=path.subject,
            event=event,
            resource_version=change.resource_version,
            requested=requested,
            earlier=earlier,
        )
        author = author_for((requested.user if requested else event.effective_user).username)
        file_change = FileChange(
            path=path.file,
            content=encoded.content,
            message=message,
            author=author,
            time=when,
            also=encoded.also,
            fingerprint=encoded.fingerprint,
        )
        patterns = () if change.body is not None else self._contents(target, ref, change)
        if patterns:  # a CRD takes its resource's files with it, a Namespace its objects
            return await sink.submit(
                TreeChange(
                    files=(file_change,),
                    prune_matching=patterns,
                    message=message,
                    author=author,
                    time=when,
                )
            )
        return await sink.submit(file_change)

    @staticmethod
    def _contents(target: GitTarget, ref: ObjectRef, change: ObjectChange) -> tuple[str, ...]:
        return contents_patterns(
            target_path=target.path,
            api_group=ref.api_group,
            resource=ref.resource,
            name=change.name,
            cluster=target.cluster,
        )

    async def _delete_collection(
        self, event: AuditEvent, routes: list[Route]
    ) -> list[asyncio.Future[CommitOutcome]]:
        """A ``deletecollection`` the event does not list: the files in the collection's
        folder whose object no longer exists are removed, in one commit per target."""
        ref = event.object_ref
        source = self._source_for(event)
        assert ref is not None and source is not None
        try:
            existing = await source.names(ref)
        except UnknownResource as exc:
            log.warning("event %s: %s", event.audit_id, exc)
            return self._skip(event, Skip.UNKNOWN_RESOURCE)
        self._remember(event.key)
        futures = []
        for route in routes:
            target = route.target
            try:
                keep = {
                    object_path(
                        target_path=target.path,
                        cluster=target.cluster,
                        api_group=ref.api_group,
                        api_version=ref.api_version,
                        resource=ref.resource,
                        namespace=ref.namespace,
                        name=name,
                    ).file
                    for name in existing
                }
                probe = object_path(
                    target_path=target.path,
                    cluster=target.cluster,
                    api_group=ref.api_group,
                    api_version=ref.api_version,
                    resource=ref.resource,
                    namespace=ref.namespace,
                    name="probe",
                )
            except InvalidName as exc:
                log.warning("event %s refused: %s", event.audit_id, exc)
                continue
            folder, subject = probe.file.rpartition("/")[0], probe.subject.rpartition("/")[0]
            # The namespace controller empties a namespace: the commit is the deleter's.
            requested = self._requester(
                event,
                ObjectChange(namespace=ref.namespace, name="", body=None, resource_version=""),
            )
            change = TreeChange(
                prune=(folder,),
                keep=frozenset(keep),
                message=commit_message(
                    action="DELETE", subject_path=subject, event=event, requested=requested
                ),
                author=author_for((requested.user if requested else event.effective_user).username),
                time=event.time or UNKNOWN_TIME,
            )
            futures.append(await self._sinks[target.key].submit(change))
            self.stats.kept_by_target[str(target.key)] += 1
        if futures:
            self.stats.kept += 1
        else:
            self.stats.skip(Skip.INVALID_NAME)
        return futures

    async def _read_from_api(self, event: AuditEvent, why: NeedsApi) -> list[ObjectChange] | Skip:
        """The event's change from the object as the API has it now (cluster mode)."""
        ref = event.object_ref
        source = self._source_for(event)
        if source is None or ref is None or not ref.name or event.verb == "deletecollection":
            log.debug("event %s: %s", event.audit_id, why)
            return Skip.NEEDS_API
        try:
            current = await source.read(dataclasses.replace(ref, subresource=""))
        except UnknownResource as exc:
            log.warning("event %s: %s", event.audit_id, exc)
            return Skip.UNKNOWN_RESOURCE
        changes = resolve_from_api(event, current, deleting=self._deletions.pending(event))
        return changes or Skip.GONE

    def _source_for(self, event: AuditEvent) -> ObjectSource | None:
        """The API of the event's cluster (in a fleet, None for a cluster without one; with
        one cluster's API, None for the events of any other cluster)."""
        if self._sources is not None:
            return self._sources.get(event.cluster)
        if self._home is not None and not self._home.owns(event.cluster):
            if event.cluster not in self._strangers:
                self._strangers.add(event.cluster)
                log.warning(
                    "events posted to /audit-webhook/%s: this receiver reads cluster %s's API, "
                    "so those that lack their object are skipped (needs-api), never read from "
                    "it; their files go to the %s folder under each target (docs/fleet.md)",
                    event.cluster,
                    self._home.name,
                    event.cluster,
                )
            return None
        return self._source

    def _stranger_in_fleet(self, cluster: str) -> None:
        """A fleet whose rules are each cluster's own has none for a name it does not know."""
        known = self._sources is not None and cluster in self._sources
        if self._by_cluster and not known and cluster not in self._strangers:
            self._strangers.add(cluster)
            log.warning(
                "events posted to %s: no cluster of that name in this fleet (--cluster "
                "NAME=KUBECONFIG), so no rules select them; skipped (no-rule)",
                f"/audit-webhook/{cluster}" if cluster else "/audit-webhook",
            )

    async def claim(self, cluster: str) -> None:
        """Events posted under ``cluster`` are about to be accepted: a receiver that is one
        cluster's pins its name first, if it has none yet (see :class:`HomeCluster`)."""
        if self._home is not None:
            await self._home.claim(cluster)

    def _creation_rules(self, keys: TargetKeys) -> bytes:
        rules = self._rules.get(keys.recipients)
        if rules is None:
            rules = self._rules[keys.recipients] = sops.creation_rules(keys.recipients)
        return rules

    def _skip(self, event: AuditEvent, reason: Skip) -> list[asyncio.Future[CommitOutcome]]:
        log.debug("event %s skipped: %s", event.audit_id, reason)
        self.stats.skip(reason)
        return []

    def _remember(self, key: EventKey) -> None:
        self._handled[key] = None
        if len(self._handled) > DEDUP_WINDOW:
            self._handled.popitem(last=False)
