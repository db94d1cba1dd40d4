"""The commit contract: subject, author and trailers of the commit for one change.

``[UPDATE] v1/configmaps/default/demo``, authored by the effective user at the time of the
change, with trailers a reader (or ``git log --format=%(trailers)``) can filter on. A deletion
someone else finished is the requester's, with ``Deleted-By:`` naming who finished it; a
state that answers several events is the latest writer's, the others ``Co-authored-by:``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Literal

from audit_reverser.events import AuditEvent
from audit_reverser.gitstore.types import Identity
from audit_reverser.pipeline.deletions import Request

Action = Literal["CREATE", "UPDATE", "DELETE"]

DERIVED_EMAIL_DOMAIN = "audit-reverser.invalid"  # RFC 2606: never a real mailbox
_EMAIL = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+$")
_NOT_SLUG = re.compile(r"[^a-z0-9._-]+")
_NOT_NAME = re.compile(r"[<>\x00-\x1f\x7f]+")


# Every kept write asks, and a cluster has few writers: remembered (an Identity is frozen).
@functools.lru_cache(maxsize=4096)
def author_for(username: str) -> Identity:
    """Name and email for a Kubernetes username; the email is the name when it is one."""
    name = _NOT_NAME.sub(" ", username).strip() or "unknown"
    if _EMAIL.match(username):
        return Identity(name=name, email=username)
    slug = _NOT_SLUG.sub("-", username.lower()).strip("-.") or "unknown"
    return Identity(name=name, email=f"{slug}@{DERIVED_EMAIL_DOMAIN}")


def _one_line(value: str) -> str:
    return " ".join(value.split())


def commit_message(
    *,
    action: Action,
    subject_path: str,
    event: AuditEvent,
    resource_version: str = "",
    requested: Request | None = None,
    earlier: Sequence[AuditEvent] = (),
) -> str:
    """The message for ``event``'s change; ``requested``: the delete request that ``event``
    finished (the requester is then the author); ``earlier``: events of the same object whose
    changes the committed state also holds (``event`` is the latest)."""
    trailers: list[tuple[str, str]] = [("Audit-ID", e.audit_id) for e in earlier]
    trailers += [("Audit-ID", event.audit_id), ("Verb", event.verb)]
    if requested is not None:
        user, impersonator = requested.user, requested.impersonated_by
        agent, ips = requested.user_agent, requested.source_ips
    else:
        user = event.effective_user
        impersonator = event.user.username if event.impersonated_user is not None else None
        agent, ips = event.user_agent, event.source_ips
    trailers.append(("User", user.username))
    if impersonator is not None:
        trailers.append(("Impersonated-By", impersonator))
    if user.groups:
        trailers.append(("Groups", ", ".join(user.groups)))
    if requested is not None:
        trailers.append(("Delete-Audit-ID", requested.audit_id))
        trailers.append(("Deleted-By", event.effective_user.username))
    if agent:
        trailers.append(("User-Agent", agent))
    if ips:
        trailers.append(("Source-IP", ", ".join(ips)))
    if event.cluster:
        trailers.append(("Cluster", event.cluster))
    if resource_version:
        trailers.append(("Resource-Version", resource_version))
    authors = {user.username}
    for other in earlier:
        name = other.effective_user.username
        if name not in authors:
            authors.add(name)
            identity = author_for(name)
            trailers.append(("Co-authored-by", f"{identity.name} <{identity.email}>"))
    body = "\n".join(f"{key}: {line}" for key, value in trailers if (line := _one_line(value)))
    return f"[{action}] {subject_path}\n\n{body}\n"


def trailer(message: str, key: str) -> str | None:
    """The value of trailer ``key`` in a commit message made by :func:`commit_message`."""
    prefix = f"{key}: "
    for line in reversed(message.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix) :]
    return None
