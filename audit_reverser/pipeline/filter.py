"""The cheap filter: which audit events can be changes to stored objects at all.

It runs on the decoded JSON before any object is built, so the great majority of what a
cluster sends (reads, watches, failures, status updates) costs almost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from audit_reverser.events import JSON_OBJECT, asks_dry_run, is_dry_run

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})

# Resources whose "create" makes no stored object: reviews answered on the spot, and
# subresources that are requests rather than state (a token, an eviction, a binding).
EPHEMERAL_RESOURCES = frozenset(
    {
        ("authentication.k8s.io", "tokenreviews"),
        ("authentication.k8s.io", "selfsubjectreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
        ("authorization.k8s.io", "selfsubjectaccessreviews"),
        ("authorization.k8s.io", "localsubjectaccessreviews"),
        ("authorization.k8s.io", "selfsubjectrulesreviews"),
        ("", "bindings"),
    }
)
EPHEMERAL_SUBRESOURCES = frozenset(
    {"token", "eviction", "binding", "approval", "proxy", "exec", "attach", "portforward", "log"}
)


class Skip(StrEnum):
    """Why an event made no commit; counted and shown in summaries and logs."""

    MALFORMED = "malformed"
    NOT_COMPLETE = "not-response-complete"
    READ = "read-verb"
    FAILED = "failed-request"
    DRY_RUN = "dry-run"
    NO_OBJECT = "no-object-ref"
    STATUS = "status-subresource"
    EPHEMERAL = "ephemeral-resource"
    NO_RULE = "no-rule"
    NOISE = "noise"
    DUPLICATE = "duplicate-audit-id"
    COALESCED = "answered-by-one-read"
    SECRET = "secret-without-encryption"
    NEEDS_API = "needs-api"
    GONE = "gone-before-read"
    EXCLUDED_USER = "excluded-user"
    EXCLUDED_FIELD_MANAGER = "excluded-field-manager"
    EXCLUDED_BY_RULE = "excluded-by-rule"
    TARGET_NOT_READY = "target-not-ready"
    CONTROLLED = "controller-owned"
    UNKNOWN_RESOURCE = "unknown-resource"
    INVALID_NAME = "invalid-name"
    STALE = "older-than-stored"
    UNCHANGED = "unchanged"
    OWN_SECRET = "audit-reverser-secret"
    REJECTED = "commit-failed"


def classify_raw(event: Mapping[str, Any]) -> Skip | None:
    """Skip reason for a decoded event, or None when it may be a change to a stored object.

    Any JSON may arrive here: a field of the wrong type is never looked up in a set (lists
    are unhashable) but ends up as the skip it would be, or as malformed in parse_event.
    """
    if event.get("stage") != "ResponseComplete":
        return Skip.NOT_COMPLETE
    verb = event.get("verb")
    if not isinstance(verb, str) or verb not in WRITE_VERBS:
        return Skip.READ if isinstance(verb, str) else Skip.MALFORMED
    status = event.get("responseStatus")
    code = status.get("code") if isinstance(status, JSON_OBJECT) else None
    if not isinstance(code, int) or not 200 <= code < 300:
        return Skip.FAILED
    uri = event.get("requestURI")
    if isinstance(uri, str) and is_dry_run(uri):
        return Skip.DRY_RUN
    if verb in ("delete", "deletecollection") and asks_dry_run(event.get("requestObject")):
        return Skip.DRY_RUN
    ref = event.get("objectRef")
    if not isinstance(ref, JSON_OBJECT) or not ref.get("resource"):
        return Skip.NO_OBJECT
    # Empty values of any type ([] or {} as much as "") mean "none".
    subresource, group = ref.get("subresource") or "", ref.get("apiGroup") or ""
    resource = ref.get("resource")
    if not all(isinstance(v, str) for v in (subresource, group, resource)):
        return Skip.MALFORMED
    if subresource == "status":
        return Skip.STATUS
    if subresource in EPHEMERAL_SUBRESOURCES:
        return Skip.EPHEMERAL
    if (group, resource) in EPHEMERAL_RESOURCES:
        return Skip.EPHEMERAL
    return None
