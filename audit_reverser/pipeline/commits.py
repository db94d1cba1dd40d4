"""The commit contract: subject, author and trailers of the commit for one change.

``[UPDATE] v1/configmaps/default/demo``, authored by the effective user at the time of the
change, with trailers a reader (or ``git log --format=%(trailers)``) can filter on.
"""

from __future__ import annotations

import re
from typing import Literal

from audit_reverser.events import AuditEvent
from audit_reverser.gitstore.types import Identity

Action = Literal["CREATE", "UPDATE", "DELETE"]

DERIVED_EMAIL_DOMAIN = "audit-reverser.invalid"  # RFC 2606: never a real mailbox
_EMAIL = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+$")
_NOT_SLUG = re.compile(r"[^a-z0-9._-]+")
_NOT_NAME = re.compile(r"[<>\x00-\x1f\x7f]+")


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
    *, action: Action, subject_path: str, event: AuditEvent, resource_version: str = ""
) -> str:
    user = event.effective_user
    trailers = [("Audit-ID", event.audit_id), ("Verb", event.verb), ("User", user.username)]
    if event.impersonated_user is not None:
        trailers.append(("Impersonated-By", event.user.username))
    if user.groups:
        trailers.append(("Groups", ", ".join(user.groups)))
    if event.user_agent:
        trailers.append(("User-Agent", event.user_agent))
    if event.source_ips:
        trailers.append(("Source-IP", ", ".join(event.source_ips)))
    if event.cluster:
        trailers.append(("Cluster", event.cluster))
    if resource_version:
        trailers.append(("Resource-Version", resource_version))
    body = "\n".join(f"{key}: {_one_line(value)}" for key, value in trailers if _one_line(value))
    return f"[{action}] {subject_path}\n\n{body}\n"


def trailer(message: str, key: str) -> str | None:
    """The value of trailer ``key`` in a commit message made by :func:`commit_message`."""
    prefix = f"{key}: "
    for line in reversed(message.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix) :]
    return None
