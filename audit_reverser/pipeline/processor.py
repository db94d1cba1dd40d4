"""From one kept audit event to file changes on the right branch writers.

Route (rules → targets), resolve (event → object states), sanitize, lay out, and submit a
:class:`FileChange` per object and target. The processor keeps the two memories the event
semantics need: auditIDs already handled (one commit per event even when the apiserver
sends it twice) and the newest resourceVersion written per file (an older event never
regresses a file).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from audit_reverser.config.model import Config, GitTarget, Key
from audit_reverser.context import about
from audit_reverser.encryption import sops
from audit_reverser.encryption.keys import TargetKeys
from audit_reverser.encryption.keys import fingerprint as fingerprint_of
from audit_reverser.events import AuditEvent, AuditID, ObjectRef
from audit_reverser.gitstore.types import CommitOutcome, FileChange, TreeChange
from audit_reverser.pipeline import canonical
from audit_reverser.pipeline.commits import Action, author_for, commit_message, trailer
from audit_reverser.pipeline.filter import Skip
from audit_reverser.pipeline.layout import (
    InvalidName,
    ObjectPath,
    check_reference,
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
    NeedsApi,
    ObjectChange,
    ObjectSource,
    UnknownResource,
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

# An event without any timestamp (only hand-made fixtures lack them) is dated at the epoch,
# visibly "unknown", rather than at the wall clock, which would break byte-identical replays.
UNKNOWN_TIME = datetime(1970, 1, 1, tzinfo=UTC)


class CommitSink(Protocol):
    async def submit(self, change: FileChange | TreeChange) -> asyncio.Future[CommitOutcome]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Encoded:
    """One object as a file of a target (see :meth:`Processor.encode`)."""

    path: ObjectPath
    content: bytes | None
    fingerprint: str | None
    also: tuple[tuple[str, bytes], ...]


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
        exclusions: Exclusions = NO_EXCLUSIONS,
    ) -> None:
        self._router = Router(config)
        self._own_secrets = own_secrets(config)
        self._sinks = sinks
        self.stats = stats
        self._keys = keys or {}
        self._fingerprint_key = fingerprint_key
        self._source = source
        # A fleet (serve --cluster): each cluster's API by name; never another cluster's.
        self._sources = sources
        self._exclusions = exclusions
        self._refused_secrets: set[Key] = set()
        self._rules: dict[tuple[str, ...], bytes] = {}  # .sops.yaml per set of recipients
        self._handled: OrderedDict[AuditID, None] = OrderedDict()
        self._versions: dict[tuple[int, str], int] = {}

    def reconfigure(
        self, config: Config, sinks: Mapping[Key, CommitSink], keys: Mapping[Key, TargetKeys]
    ) -> None:
        """New rules, targets and keys; the next event is routed by them."""
        self._router = Router(config)
        self._own_secrets = own_secrets(config)
        self._sinks = sinks
        self._keys = keys
        self._refused_secrets.clear()

    def remember(self, audit_ids: Iterable[AuditID]) -> None:
        """AuditIDs an earlier run handled: the same event sent again makes no commit."""
        for audit_id in audit_ids:
            self._remember(audit_id)

    def recall_versions(self, sink: CommitSink, commits: Iterable[tuple[str, str]]) -> None:
        """Newest resourceVersions of files committed by ``(path, message)`` before a crash,
        so that events processed again never regress a file a later event already wrote."""
        for path, message in commits:
            version = _rv_number(trailer(message, "Resource-Version") or "")
            key = (id(sink), path)
            if version is not None and version > self._versions.get(key, -1):
                self._versions[key] = version

    def routes(self, event: AuditEvent) -> list[Route] | Skip:
        """Targets for the event, or why it goes nowhere. Cheap: no object is touched."""
        with about(audit_id=event.audit_id):
            return self._routes(event)

    def _routes(self, event: AuditEvent) -> list[Route] | Skip:
        ref = event.object_ref
        if ref is None:
            return Skip.NO_OBJECT
        routes = self._router.routes(ref, event.verb, event)
        if not routes:
            # A rule that selected it but excludes its user or tool says more than no-rule.
            if self._router.routes(ref, event.verb):
                return Skip.EXCLUDED_BY_RULE
            return Skip.NO_RULE
        if (ref.api_group, ref.resource) in NOISE_RESOURCES:
            routes = [r for r in routes if r.explicit]
            if not routes:
                return Skip.NOISE
        if is_own_secret(ref, self._own_secrets):
            return Skip.OWN_SECRET
        # A target whose provider cannot be used (rules from a cluster) has no writer.
        routes = [r for r in routes if r.target.key in self._sinks]
        if not routes:
            return Skip.TARGET_NOT_READY
        if self._exclusions.excluded_user(event):
            return Skip.EXCLUDED_USER
        if self._exclusions.excluded_field_manager(event):
            return Skip.EXCLUDED_FIELD_MANAGER
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
        return routes

    async def process(self, event: AuditEvent) -> list[asyncio.Future[CommitOutcome]]:
        """Submit the event's changes; the futures resolve when each is committed locally."""
        with about(audit_id=event.audit_id):
            return await self._process(event)

    async def _process(self, event: AuditEvent) -> list[asyncio.Future[CommitOutcome]]:
        routes = self.routes(event)
        if isinstance(routes, Skip):
            return self._skip(event, routes)
        if event.audit_id in self._handled:
            return self._skip(event, Skip.DUPLICATE)
        try:
            changes = resolve_offline(event)
        except NeedsApi as exc:
            if event.verb == "deletecollection" and self._source_for(event) is not None:
                return await self._delete_collection(event, routes)
            read = await self._read_from_api(event, exc)
            if isinstance(read, Skip):
                return self._skip(event, read)
            changes = read

        self._remember(event.audit_id)
        futures: list[asyncio.Future[CommitOutcome]] = []
        last_reason = Skip.UNCHANGED
        for route in routes:
            for change in changes:
                if not route.explicit and controlled(change.body):
                    last_reason = Skip.CONTROLLED  # generated from its owner, which is in Git
                    continue
                outcome = await self._submit(event, route.target, change)
                if isinstance(outcome, Skip):
                    last_reason = outcome
                else:
                    futures.append(outcome)
                    self.stats.kept_by_target[str(route.target.key)] += 1
        if futures:
            self.stats.kept += 1
        else:
            self.stats.skip(last_reason)
        return futures

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
        self, event: AuditEvent, target: GitTarget, change: ObjectChange
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
        version_key = (id(sink), path.file)
        version = _rv_number(change.resource_version)
        stored = self._versions.get(version_key)
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
        else:
            action = "CREATE" if event.verb == "create" else "UPDATE"
        if version is not None:
            self._versions[version_key] = version
        file_change = FileChange(
            path=path.file,
            content=encoded.content,
            message=commit_message(
                action=action,
                subject_path=path.subject,
                event=event,
                resource_version=change.resource_version,
            ),
            author=author_for(event.effective_user.username),
            time=when,
            also=encoded.also,
            fingerprint=encoded.fingerprint,
        )
        return await sink.submit(file_change)

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
        self._remember(event.audit_id)
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
            change = TreeChange(
                prune=(folder,),
                keep=frozenset(keep),
                message=commit_message(action="DELETE", subject_path=subject, event=event),
                author=author_for(event.effective_user.username),
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
        changes = resolve_from_api(event, current)
        return changes or Skip.GONE

    def _source_for(self, event: AuditEvent) -> ObjectSource | None:
        """The API of the event's cluster (in a fleet, None for a cluster without one)."""
        return self._source if self._sources is None else self._sources.get(event.cluster)

    def _creation_rules(self, keys: TargetKeys) -> bytes:
        rules = self._rules.get(keys.recipients)
        if rules is None:
            rules = self._rules[keys.recipients] = sops.creation_rules(keys.recipients)
        return rules

    def _skip(self, event: AuditEvent, reason: Skip) -> list[asyncio.Future[CommitOutcome]]:
        log.debug("event %s skipped: %s", event.audit_id, reason)
        self.stats.skip(reason)
        return []

    def _remember(self, audit_id: AuditID) -> None:
        self._handled[audit_id] = None
        if len(self._handled) > DEDUP_WINDOW:
            self._handled.popitem(last=False)
