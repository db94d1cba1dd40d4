"""Audit events as the kube-apiserver sends them, and the typed event the pipeline passes on.

The ``TypedDict``s describe the wire format of ``audit.k8s.io/v1`` (and the v1beta1 log
format). :func:`parse_event` checks one decoded item once and turns it into an immutable
:class:`AuditEvent`; nothing past this module touches the raw dictionaries.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NewType, TypedDict
from urllib.parse import parse_qs

from audit_reverser.errors import EventError, shown

AuditID = NewType("AuditID", str)
# Which event an event is, to know it when it comes again (a batch the apiserver retried, a
# journal read again): its Audit-ID and when its request was received.
EventKey = NewType("EventKey", str)
# The apiserver makes UUIDs, or takes the client's Audit-ID header: up to 256 letters,
# digits and hyphens since Kubernetes 1.29 or so, anything before. An Audit-ID that is not
# one short printable token is written as a digest of it (DIGESTED_PREFIX), so that it can
# neither reach logs and trailers as it is nor keep the client's change out of Git.
_AUDIT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
DIGESTED_PREFIX = "sha256-"

# A tuple, not a set: membership of any decoded JSON value (a list, a dict) is then a plain
# comparison instead of a TypeError for an unhashable value.
AUDIT_API_VERSIONS = ("audit.k8s.io/v1", "audit.k8s.io/v1beta1")

# What a decoded JSON object may be, for isinstance: orjson makes dicts, and a check against
# the Mapping ABC alone takes five times as long (0.25 µs), a dozen times per kept event.
JSON_OBJECT = (dict, Mapping)


class UserInfoDict(TypedDict, total=False):
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]]


class ObjectReferenceDict(TypedDict, total=False):
    resource: str
    namespace: str
    name: str
    uid: str
    apiGroup: str
    apiVersion: str
    resourceVersion: str
    subresource: str


class ResponseStatusDict(TypedDict, total=False):
    code: int
    status: str
    message: str
    reason: str


class EventDict(TypedDict, total=False):
    kind: str
    apiVersion: str
    level: str
    auditID: str
    stage: str
    requestURI: str
    verb: str
    user: UserInfoDict
    impersonatedUser: UserInfoDict | None
    sourceIPs: list[str]
    userAgent: str
    objectRef: ObjectReferenceDict
    responseStatus: ResponseStatusDict
    requestObject: Any
    responseObject: Any
    requestReceivedTimestamp: str
    stageTimestamp: str
    timestamp: str
    annotations: dict[str, str]


class EventListDict(TypedDict):
    kind: str
    apiVersion: str
    items: list[EventDict]


@dataclass(frozen=True, kw_only=True, slots=True)
class User:
    username: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectRef:
    """What the request addressed. Empty strings stand for 'not given'."""

    resource: str
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    name: str = ""
    subresource: str = ""
    resource_version: str = ""

    @property
    def group_version(self) -> str:
        """``apps/v1`` or, for the core group, ``v1``."""
        return f"{self.api_group}/{self.api_version}" if self.api_group else self.api_version


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditEvent:
    audit_id: AuditID
    verb: str
    stage: str
    level: str
    request_uri: str
    user: User
    impersonated_user: User | None
    source_ips: tuple[str, ...]
    user_agent: str
    object_ref: ObjectRef | None
    status_code: int | None
    response_object: Mapping[str, Any] | None
    time: datetime | None
    cluster: str = ""
    # requestReceivedTimestamp as sent: the apiserver's, unlike the Audit-ID, which the
    # client may choose (and choose again, to pass a change off as one already handled).
    received: str = ""

    @property
    def key(self) -> EventKey:
        return EventKey(f"{self.audit_id} {self.received}")

    @property
    def effective_user(self) -> User:
        """The user the change is attributed to: the impersonated one when present."""
        return self.impersonated_user or self.user


def is_dry_run(request_uri: str) -> bool:
    """True when the request's query asked the apiserver not to persist anything."""
    # Cheap test first: almost no request is a dry run. A percent-encoded key ("dry%52un")
    # is one too: the apiserver decodes it.
    if "dryRun" not in request_uri and "%" not in request_uri:
        return False
    _, _, query = request_uri.partition("?")
    return any(v for v in parse_qs(query).get("dryRun", ()))


def asks_dry_run(request_object: object) -> bool:
    """True when a delete's body (DeleteOptions, where kubectl puts ``--dry-run=server``)
    asked the apiserver not to persist anything."""
    return isinstance(request_object, JSON_OBJECT) and bool(request_object.get("dryRun"))


def parse_time(value: object) -> datetime | None:
    """RFC 3339 with optional fraction, as the apiserver writes MicroTime; None when absent."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _text(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EventError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


# The same few users and object references come back in event after event: each is made
# once and shared (they are immutable), which halves the cost of parsing an event. Bounded:
# emptied when full.
_INTERNED_LIMIT = 4096
_users: dict[tuple[object, ...], User] = {}
_refs: dict[tuple[object, ...], ObjectRef] = {}


def _user(raw: object, where: str) -> User:
    if not isinstance(raw, JSON_OBJECT):
        raise EventError(f"{where}: must be an object")
    groups = raw.get("groups") or ()
    try:  # a user seen before was checked then
        key = (raw.get("username"), tuple(groups) if isinstance(groups, list) else groups)
        user = _users.get(key)
    except TypeError:  # not hashable: not strings
        user = None
    if user is not None:
        return user
    username = _text(raw, "username", where)
    if not isinstance(groups, list | tuple) or not all(isinstance(g, str) for g in groups):
        raise EventError(f"{where}: field 'groups' must be a list of strings")
    if len(_users) >= _INTERNED_LIMIT:
        _users.clear()
    user = _users[key] = User(username=username, groups=tuple(groups))
    return user


def _object_ref(raw: object, where: str) -> ObjectRef | None:
    if raw is None:
        return None
    if not isinstance(raw, JSON_OBJECT):
        raise EventError(f"{where}: must be an object")
    get = raw.get
    key = (
        get("resource"),
        get("apiGroup"),
        get("apiVersion"),
        get("namespace"),
        get("name"),
        get("subresource"),
        get("resourceVersion"),
    )
    try:  # a reference seen before was checked then
        ref = _refs.get(key)
    except TypeError:  # not hashable: not strings
        ref = None
    if ref is not None:
        return ref
    resource = _text(raw, "resource", where)
    if not resource:
        return None
    if len(_refs) >= _INTERNED_LIMIT:
        _refs.clear()
    ref = _refs[key] = ObjectRef(
        resource=resource,
        api_group=_text(raw, "apiGroup", where),
        api_version=_text(raw, "apiVersion", where),
        namespace=_text(raw, "namespace", where),
        name=_text(raw, "name", where),
        subresource=_text(raw, "subresource", where),
        resource_version=_text(raw, "resourceVersion", where),
    )
    return ref


def parse_event(raw: object, *, cluster: str = "") -> AuditEvent:
    """Check one decoded audit event and make it immutable.

    Raises :class:`EventError` naming the auditID and field when the item is not an event.
    """
    if not isinstance(raw, JSON_OBJECT):
        raise EventError(f"event must be a JSON object, got {type(raw).__name__}")
    audit_id = raw.get("auditID")
    if not isinstance(audit_id, str) or not audit_id:
        raise EventError(f"event has no auditID: {shown(audit_id)}")
    if not _AUDIT_ID.match(audit_id):
        digest = hashlib.sha256(audit_id.encode("utf-8", "surrogatepass")).hexdigest()
        audit_id = DIGESTED_PREFIX + digest
    where = f"event {audit_id}"
    api_version = raw.get("apiVersion")
    if api_version is not None and api_version not in AUDIT_API_VERSIONS:
        raise EventError(f"{where}: unsupported apiVersion {shown(api_version)}")
    kind = raw.get("kind")
    if kind is not None and kind != "Event":
        raise EventError(f"{where}: kind must be 'Event', got {shown(kind)}")
    verb = _text(raw, "verb", where)
    stage = _text(raw, "stage", where)
    if not verb or not stage:
        raise EventError(f"{where}: 'verb' and 'stage' are required")
    status = raw.get("responseStatus")
    code = status.get("code") if isinstance(status, JSON_OBJECT) else None
    if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
        raise EventError(f"{where}: responseStatus.code must be an integer")
    impersonated = raw.get("impersonatedUser")
    source_ips = raw.get("sourceIPs") or ()
    if not isinstance(source_ips, list | tuple) or not all(isinstance(i, str) for i in source_ips):
        raise EventError(f"{where}: field 'sourceIPs' must be a list of strings")
    response_object = raw.get("responseObject")
    time = (
        parse_time(raw.get("stageTimestamp"))
        or parse_time(raw.get("requestReceivedTimestamp"))
        or parse_time(raw.get("timestamp"))
    )
    received = raw.get("requestReceivedTimestamp")
    return AuditEvent(
        audit_id=AuditID(audit_id),
        verb=verb,
        stage=stage,
        level=_text(raw, "level", where),
        request_uri=_text(raw, "requestURI", where),
        user=_user(raw.get("user"), f"{where}: user"),
        impersonated_user=(
            _user(impersonated, f"{where}: impersonatedUser") if impersonated else None
        ),
        source_ips=tuple(source_ips),
        user_agent=_text(raw, "userAgent", where),
        object_ref=_object_ref(raw.get("objectRef"), f"{where}: objectRef"),
        status_code=code,
        response_object=response_object if isinstance(response_object, JSON_OBJECT) else None,
        time=time,
        cluster=cluster,
        received=received if isinstance(received, str) else "",
    )
