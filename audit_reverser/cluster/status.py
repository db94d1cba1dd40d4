"""Status on the custom resources, like the seed's: a ``Ready`` condition with a reason and a
message on each GitProvider, GitTarget, WatchRule and ClusterWatchRule; ``lastCommit``,
``lastPushTime`` and ``observedGeneration`` on GitTargets.

Written with merge patches to the status subresource, and only when something other than
the time changed, so that no write storm follows a busy day. Our own status writes never
come back as commits (writes to ``status`` subresources are skipped, unless one finishes a
deletion, which ours never do) nor as rule changes (rules.py ignores changes of status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from audit_reverser.cluster.api import ApiUnavailable, KubeApi
from audit_reverser.cluster.rules import (
    BACKUP_PENDING,
    BACKUP_WARNING,
    KINDS,
    ClusterRules,
    ObjectId,
)
from audit_reverser.config.model import API_VERSION, Config, Key
from audit_reverser.encryption.keys import TargetKeys
from audit_reverser.gitstore.health import RemoteHealth
from audit_reverser.gitstore.writer import BranchWriter

log = logging.getLogger(__name__)

REPORT_S = 60.0
_MESSAGE_LIMIT = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    ready: bool
    reason: str  # CamelCase, as Kubernetes conditions want
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)  # more status fields (GitTarget)


@dataclass(frozen=True, kw_only=True, slots=True)
class State:
    """What the receiver knows, for the verdicts."""

    config: Config
    keys: Mapping[Key, TargetKeys]
    writers: Mapping[Key, BranchWriter]  # by GitTarget
    health: Mapping[Key, RemoteHealth]  # by GitProvider, from the last probe
    provider_problems: Mapping[Key, str]  # providers whose credentials cannot be used


# The end of the message of a GitTarget refused in a fleet (cluster.fleet).
FOLDER_IN_USE = "two clusters never write one folder"


def _reason_of(problem: str) -> str:
    if FOLDER_IN_USE in problem:
        return "FolderInUse"
    if "not allowed" in problem:
        return "BranchNotAllowed"
    if ("GitProvider" in problem or "GitRepository" in problem) and "not found" in problem:
        return "ProviderNotFound"
    if "GitTarget" in problem and "not found" in problem:
        return "TargetNotFound"
    if "Secret" in problem:
        return "CredentialsInvalid"
    return "InvalidSpec"


def verdicts(
    objects: Mapping[ObjectId, Mapping[str, Any]],
    problems: Mapping[ObjectId, str],
    state: State,
) -> dict[ObjectId, Verdict]:
    """The status each object should show."""
    found: dict[ObjectId, Verdict] = {}
    for oid, obj in objects.items():
        kind, namespace, name = oid
        key = Key(namespace=namespace, name=name)
        problem = problems.get(oid)
        if problem is not None:
            found[oid] = Verdict(ready=False, reason=_reason_of(problem), message=problem)
        elif kind == "GitProvider" and key in state.provider_problems:
            message = state.provider_problems[key]
            # Nothing is committed unsigned: a signing key that cannot be used stops the
            # provider as credentials that cannot be used do.
            signing = any(k in message for k in ("signingKey", "committerName", "committerEmail"))
            reason = "SigningKeyInvalid" if signing else "CredentialsInvalid"
            found[oid] = Verdict(ready=False, reason=reason, message=message)
        elif kind == "GitProvider":
            health = state.health.get(key)
            if health is None:
                found[oid] = Verdict(ready=False, reason="Checking", message="not probed yet")
            else:
                found[oid] = Verdict(
                    ready=health.ready, reason=health.reason, message=health.message
                )
        elif kind == "GitTarget":
            found[oid] = _target_verdict(key, obj, state)
        else:
            found[oid] = Verdict(ready=True, reason="Ready", message="selecting for its GitTarget")
    return found


def _target_verdict(key: Key, obj: Mapping[str, Any], state: State) -> Verdict:
    generation = (obj.get("metadata") or {}).get("generation")
    fields: dict[str, Any] = {}
    if isinstance(generation, int):
        fields["observedGeneration"] = generation
    writer = state.writers.get(key)
    target = state.config.targets.get(key)
    if writer is None or target is None:
        # A Flux GitRepository has no status of ours: the target says what is wrong with it.
        problem = state.provider_problems.get(target.provider_key) if target else None
        return Verdict(
            ready=False,
            reason="ProviderNotReady",
            message=problem or "its GitProvider cannot be used",
            fields=fields,
        )
    if writer.tip:
        fields["lastCommit"] = writer.tip
    if writer.stats.last_push_at is not None:
        fields["lastPushTime"] = writer.stats.last_push_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    keys = state.keys.get(key)
    if target.encryption is not None and keys is not None and keys.problem is not None:
        return Verdict(
            ready=False, reason="EncryptionNotReady", message=keys.problem, fields=fields
        )
    if writer.last_push_error:
        return Verdict(
            ready=False, reason="PushFailed", message=writer.last_push_error, fields=fields
        )
    message = f"writing to branch {target.branch}, folder {target.path or '/'}"
    if target.encryption is not None and target.encryption.secret_name:
        secret_key = Key(namespace=key.namespace, name=target.encryption.secret_name)
        secret = state.config.secrets.get(secret_key)
        if secret is not None and secret.annotations.get(BACKUP_WARNING) == BACKUP_PENDING:
            message += (
                f"; WARNING: back up the age key in Secret {secret_key}, then remove its "
                f"{BACKUP_WARNING} annotation"
            )
    return Verdict(ready=True, reason="Ready", message=message, fields=fields)


def _condition(verdict: Verdict, previous: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    status = "True" if verdict.ready else "False"
    message = verdict.message[:_MESSAGE_LIMIT]
    same = previous is not None and previous.get("status") == status
    return {
        "type": "Ready",
        "status": status,
        "reason": re.sub(r"[^A-Za-z0-9_,:]", "", verdict.reason) or "Unknown",
        "message": message,
        # Only a change of status is a transition.
        "lastTransitionTime": (previous or {}).get("lastTransitionTime", now) if same else now,
    }


def desired_status(verdict: Verdict, current: Mapping[str, Any], now: str) -> dict[str, Any] | None:
    """The status to write, or None when what the object shows already says it."""
    conditions = current.get("conditions") or []
    previous = next(
        (c for c in conditions if isinstance(c, dict) and c.get("type") == "Ready"), None
    )
    ready = _condition(verdict, previous, now)
    others = [c for c in conditions if isinstance(c, dict) and c.get("type") != "Ready"]
    wanted = {**verdict.fields, "conditions": [*others, ready]}
    if all(current.get(k) == v for k, v in wanted.items()):
        return None
    return wanted


class StatusReporter:
    """Writes the verdicts after every change of the rules and every ``REPORT_S``."""

    def __init__(
        self,
        api: KubeApi,
        rules: ClusterRules,
        state: Callable[[], Awaitable[State]],
        problems: Callable[[], Mapping[ObjectId, str]] | None = None,
    ) -> None:
        """``problems``: the broken objects, when more than ``rules`` finds (a fleet)."""
        self._api = api
        self._rules = rules
        self._state = state
        self._problems = problems or (lambda: rules.problems)
        self.writes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status reporter")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.report()
            except ApiUnavailable as exc:
                log.warning("status not written: %s", exc)
            except Exception:  # status is a report; it must never stop the receiver
                log.exception("status report failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_S):
                    await self._wake.wait()
            self._wake.clear()

    async def report(self) -> int:
        """Write the status of every object whose status changed; how many were written."""
        state = await self._state()
        objects = self._rules.objects()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        written = 0
        for oid, verdict in verdicts(objects, self._problems(), state).items():
            current = objects[oid].get("status") or {}
            wanted = desired_status(verdict, current, now)
            if wanted is None:
                continue
            kind, namespace, name = oid
            scope = f"/namespaces/{namespace}" if namespace else ""
            path = f"/apis/{API_VERSION}{scope}/{KINDS[kind]}/{name}"
            if await self._api.patch_status(path, wanted):
                written += 1
                # What the watch will bring back; no second write in the meantime.
                objects[oid]["status"] = {**current, **wanted}
        self.writes += written
        return written
