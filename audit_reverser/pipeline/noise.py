"""Changes nobody wants as commits: made by the cluster's own controllers, by tools whose
changes are in Git already, or objects that a controller generates.

- ``excluded_users``: globs over usernames (the user who sent the request, and the one it
  impersonated); the defaults are the control plane's own components, whose writes to
  selected objects are bookkeeping (a Deployment's revision annotation, a node's heartbeat).
  A write of theirs that makes a selected object disappear is no bookkeeping, though: the
  processor commits it as the deletion it finishes (see ``pipeline/deletions.py``).
- ``excluded_field_managers``: globs over the ``fieldManager`` of the request (a GitOps
  tool's server-side apply, e.g. ``kustomize-controller`` or ``argocd-controller``).
- Objects with a ``controller: true`` ownerReference (the ReplicaSets of a Deployment, the
  Pods of a Job) are generated from their owner, which is in Git; skipped unless a rule
  names their resource.
- The Secrets audit-reverser itself uses (GitProvider credentials, GitTarget encryption
  keys): even encrypted, a deploy key does not belong in the repository it opens, and an age
  key encrypted to itself is no backup, only a false sense of one.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from audit_reverser.config.model import Config
from audit_reverser.events import JSON_OBJECT, AuditEvent, ObjectRef

DEFAULT_EXCLUDED_USERS = (
    "system:kube-controller-manager",
    "system:kube-scheduler",
    "system:apiserver",
    "system:node:*",
    "system:serviceaccount:kube-system:*",
)


@functools.lru_cache(maxsize=64)
def _any_of(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One regex matching what any of ``globs`` matches (``fnmatchcase``): asked for every
    kept write, one match instead of one per glob and name."""
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs) or "(?!)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Exclusions:
    users: tuple[str, ...] = DEFAULT_EXCLUDED_USERS
    field_managers: tuple[str, ...] = ()

    def excluded_user(self, event: AuditEvent) -> bool:
        if not self.users:
            return False
        users = _any_of(self.users)
        return bool(
            users.match(event.user.username)
            or (event.impersonated_user and users.match(event.impersonated_user.username))
        )

    def excluded_field_manager(self, event: AuditEvent) -> bool:
        if not self.field_managers:
            return False
        manager = field_manager(event.request_uri)
        return bool(manager) and _any_of(self.field_managers).match(manager) is not None

    def excludes(self, event: AuditEvent) -> bool:
        return self.excluded_user(event) or self.excluded_field_manager(event)


NO_EXCLUSIONS = Exclusions(users=())


def field_manager(request_uri: str) -> str:
    """The ``fieldManager`` query parameter of a write, or ''."""
    values = parse_qs(urlsplit(request_uri).query).get("fieldManager") or [""]
    return values[0]


def controlled(body: Mapping[str, Any] | None) -> bool:
    """True when a controller owns the object (it is generated from its owner)."""
    if body is None:
        return False
    metadata = body.get("metadata")
    owners = metadata.get("ownerReferences") if isinstance(metadata, JSON_OBJECT) else None
    return isinstance(owners, list) and any(
        isinstance(owner, JSON_OBJECT) and owner.get("controller") is True for owner in owners
    )


def own_secrets(config: Config) -> frozenset[tuple[str, str, str]]:
    """(cluster, namespace, name) of the Secrets the configuration names for audit-reverser's
    own use; the cluster is '' unless the rules are several clusters' own (a fleet)."""
    names = {
        (provider.key.cluster, provider.key.namespace, provider.secret_name)
        for provider in config.providers.values()
        if provider.secret_name
    }
    names.update(
        (target.key.cluster, target.key.namespace, target.encryption.secret_name)
        for target in config.targets.values()
        if target.encryption is not None and target.encryption.secret_name
    )
    return frozenset(names)


def is_own_secret(
    ref: ObjectRef, secrets: frozenset[tuple[str, str, str]], cluster: str = ""
) -> bool:
    return (
        ref.api_group == ""
        and ref.resource == "secrets"
        and (cluster, ref.namespace, ref.name) in secrets
    )
