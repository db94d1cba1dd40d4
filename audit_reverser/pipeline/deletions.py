"""Who asked for a deletion that someone else finishes.

A delete of an object held by finalizers leaves it in place; a controller finishes it later
with a write of its own (the pvc-protection controller removing its finalizer, the namespace
controller emptying a namespace, the garbage collector deleting an owner's dependents, the
apiserver releasing a CRD). That write is a ``[DELETE]`` commit in the name of the person who
asked, so requests are remembered here, each memory bounded (least recently used goes):

- by object: the delete that named it, or the deletecollection that listed it;
- by uid: a dependent's owner deleted (the garbage collector's cascade);
- by namespace: the namespace deleted (what the namespace controller deletes in it).

Requests are remembered when the event is routed, before any earlier event is processed:
the apiserver may send the request and its completion in one EventList. They outlive a
restart through :meth:`Deletions.export` and :meth:`Deletions.restore` (the newest
:data:`KEPT_LIMIT` requests younger than :data:`KEPT_AGE_S`; see
:class:`DeletionsStore`: :mod:`audit_reverser.pipeline.deletions_file` for one replica,
:mod:`audit_reverser.ha.deletions` when replicas share a journal in Redis).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

from audit_reverser.events import JSON_OBJECT, AuditEvent, AuditID, User
from audit_reverser.pipeline.resolve import NeedsApi, metadata_of, resolve_offline

DELETE_VERBS = frozenset({"delete", "deletecollection"})
LIMIT = 100_000
# What outlives a restart: a deletion held longer than a week (a PVC still mounted, a stuck
# finalizer) is finished by whoever finishes it; the bound keeps the saved file small.
KEPT_LIMIT = 10_000
KEPT_AGE_S = 7 * 24 * 3600.0

# cluster, group, resource, namespace, name ('' for a whole collection)
ObjectKey = tuple[str, str, str, str, str]


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """A delete request: who sent it (as the commit author) and whether that is a person
    (not the control plane or an excluded tool)."""

    user: User
    impersonated_by: str | None
    audit_id: AuditID
    user_agent: str
    source_ips: tuple[str, ...]
    person: bool
    at: float = 0.0  # wall-clock seconds when it was received: the age bound of what is kept


class RequestDict(TypedDict):
    username: str
    groups: list[str]
    impersonated_by: str | None
    audit_id: str
    user_agent: str
    source_ips: list[str]
    person: bool
    at: float


class Saved(TypedDict):
    """The memories as saved: requests by index, the keys that name them, owner links."""

    requests: list[RequestDict]
    objects: list[tuple[list[str], int]]  # ObjectKey, request index
    uids: list[tuple[str, int]]
    owners: list[tuple[list[str], list[str]]]  # ObjectKey of an owned object, owner uids


def as_saved(data: object) -> Saved | None:
    """``data`` (parsed JSON) as :class:`Saved` when it has that shape at the top; the rest
    is checked by :meth:`Deletions.restore`."""
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("requests", "objects", "uids", "owners")
    ):
        return None
    return data  # type: ignore[return-value]


class DeletionsStore(Protocol):
    """Where :meth:`Deletions.export` is kept for the next run (or the next writer)."""

    @property
    def where(self) -> str:
        """What to name in logs: the file, the Redis key."""
        ...

    async def load(self) -> Saved | None:
        """The saved memories; None when there are none (or they cannot be read: logged,
        and kept aside for a person to look at)."""
        ...

    async def save(self, saved: Saved) -> None:
        """Replace the saved memories, durably; raises :class:`OSError` or
        :class:`~audit_reverser.errors.AuditReverserError` when they are not."""
        ...

    async def set_aside(self, why: str) -> None:
        """Keep damaged memories aside (logged with ``why``); the next load finds none."""
        ...


def object_key(
    event: AuditEvent, namespace: str | None = None, name: str | None = None
) -> ObjectKey:
    ref = event.object_ref
    assert ref is not None
    if ref.api_group == "" and ref.resource == "namespaces":
        namespace = ""  # the apiserver names a Namespace's own name as its objectRef.namespace
    return (
        event.cluster,
        ref.api_group,
        ref.resource,
        ref.namespace if namespace is None else namespace,
        ref.name if name is None else name,
    )


def namespace_key(cluster: str, namespace: str) -> ObjectKey:
    return (cluster, "", "namespaces", "", namespace)


def _uid_of(response: Mapping[str, Any] | None) -> str:
    """The uid a delete's response names: the object's, or the Status details' uid."""
    if response is None:
        return ""
    details = response.get("details")
    uid = (details if isinstance(details, JSON_OBJECT) else metadata_of(response)).get("uid")
    return uid if isinstance(uid, str) else ""


def _gone_at_once(event: AuditEvent) -> bool:
    """Whether the delete's answer shows its object gone (not held by finalizers)."""
    try:
        changes = resolve_offline(event)
    except NeedsApi:
        return False
    return bool(changes) and all(change.body is None for change in changes)


class _Bounded(OrderedDict[Any, Any]):
    def put(self, key: object, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > LIMIT:
            self.popitem(last=False)


class Deletions:
    def __init__(self) -> None:
        self._by_object: _Bounded = _Bounded()  # ObjectKey -> Request
        self._by_uid: _Bounded = _Bounded()  # uid -> Request
        self._uids: _Bounded = _Bounded()  # ObjectKey -> uid, from objects seen
        self._owners: _Bounded = _Bounded()  # ObjectKey -> owner uids, from objects seen
        self.changes = 0  # counts changes of what export() returns: saved when it moved

    def asked(self, event: AuditEvent, *, person: bool) -> None:
        """Remember the delete request ``event`` (any other event is ignored)."""
        ref = event.object_ref
        if event.verb not in DELETE_VERBS or ref is None:
            return
        self.changes += 1
        user = event.effective_user
        request = Request(
            user=user,
            impersonated_by=event.user.username if event.impersonated_user else None,
            audit_id=event.audit_id,
            user_agent=event.user_agent,
            source_ips=event.source_ips,
            person=person,
            at=time.time(),
        )
        keys = [object_key(event)]
        response = event.response_object
        if event.verb == "deletecollection":
            # Only the listed items: a collection remembered as a whole would hold whatever
            # is made in it later (a namespace's deletion is remembered as the namespace's).
            keys = []
            items = response.get("items") if response is not None else None
            for item in items if isinstance(items, list) else ():
                metadata = metadata_of(item)
                name, uid = metadata.get("name"), metadata.get("uid")
                if isinstance(name, str) and name:
                    keys.append(object_key(event, name=name))
                if isinstance(uid, str) and uid:
                    self._by_uid.put(uid, request)
        else:
            uid = _uid_of(response) or self._uids.get(keys[0], "")
            if uid:
                self._by_uid.put(uid, request)
            if _gone_at_once(event):
                keys = []  # nobody finishes it: only its dependents' cascade may follow
        for key in keys:
            previous = self._by_object.get(key)
            if previous is None or person or not previous.person:  # a person's request wins
                self._by_object.put(key, request)

    def pending(self, event: AuditEvent) -> bool:
        """True when someone asked for the deletion of the object ``event`` writes, or of its
        namespace: a write by anyone may be the one that finishes it."""
        ref = event.object_ref
        if ref is None:
            return False
        return self.pending_object(
            event.cluster, ref.api_group, ref.resource, ref.namespace, ref.name
        )

    def pending_object(
        self, cluster: str, group: str, resource: str, namespace: str, name: str
    ) -> bool:
        if group == "" and resource == "namespaces":
            return (cluster, group, resource, "", name) in self._by_object
        return (cluster, group, resource, namespace, name) in self._by_object or (
            bool(namespace) and namespace_key(cluster, namespace) in self._by_object
        )

    def requester(self, event: AuditEvent, namespace: str, name: str) -> Request | None:
        """Who asked for the deletion of this object that ``event`` finished: a person when
        one is known (the object's own request, its owner's or its namespace's), else the
        controller that asked, else None."""
        key = object_key(event, namespace=namespace, name=name)
        candidates = [
            self._by_object.get(key),
            *(self._by_uid.get(uid) for uid in self._owners.get(key, ())),
        ]
        if namespace:
            candidates.append(self._by_object.get(namespace_key(event.cluster, namespace)))
        found = [c for c in candidates if c is not None]
        return next((c for c in found if c.person), found[0] if found else None)

    def seen(
        self, event: AuditEvent, namespace: str, name: str, body: Mapping[str, Any] | None
    ) -> None:
        """Remember the uid and owners of an object written, or forget one that is gone (or
        made anew: an old request is not the new object's)."""
        key = object_key(event, namespace=namespace, name=name)
        if (event.verb == "create" or body is None) and self._by_object.pop(key, None):
            self.changes += 1
        if body is None:
            self._uids.pop(key, None)
            self._owners.pop(key, None)
            return
        metadata = metadata_of(body)
        uid = metadata.get("uid")
        if isinstance(uid, str) and uid:
            self._uids.put(key, uid)
        owners = metadata.get("ownerReferences")
        uids = tuple(
            o["uid"]
            for o in (owners if isinstance(owners, list) else ())
            if isinstance(o, JSON_OBJECT) and isinstance(o.get("uid"), str)
        )
        if uids:
            if self._owners.get(key) != uids and any(u in self._by_uid for u in uids):
                self.changes += 1  # a dependent of an owner whose deletion was asked for
            self._owners.put(key, uids)
        elif key in self._owners:
            del self._owners[key]

    def export(self, now: float) -> Saved:
        """What a restart must not forget: the newest requests younger than the age bound
        (an owner's only while objects it owns are known), and which objects those owners
        own (the garbage collector's cascade)."""
        oldest = now - KEPT_AGE_S
        requests: dict[int, int] = {}  # id(Request) -> index
        saved: Saved = {"requests": [], "objects": [], "uids": [], "owners": []}

        def index(request: Request) -> int | None:
            if request.at < oldest:
                return None
            found = requests.get(id(request))
            if found is None:
                found = requests[id(request)] = len(saved["requests"])
                saved["requests"].append(
                    {
                        "username": request.user.username,
                        "groups": list(request.user.groups),
                        "impersonated_by": request.impersonated_by,
                        "audit_id": request.audit_id,
                        "user_agent": request.user_agent,
                        "source_ips": list(request.source_ips),
                        "person": request.person,
                        "at": request.at,
                    }
                )
            return found

        for key, request in list(self._by_object.items())[-KEPT_LIMIT:]:
            if (i := index(request)) is not None:
                saved["objects"].append((list(key), i))
        # An owner's request matters only while objects it owns are known to exist.
        owners = {uid for uids in self._owners.values() for uid in uids}
        owned = [(uid, r) for uid, r in self._by_uid.items() if uid in owners]
        for uid, request in owned[-KEPT_LIMIT:]:
            if (i := index(request)) is not None:
                saved["uids"].append((uid, i))
        asked = {uid for uid, _ in saved["uids"]}
        if asked:
            for key, uids in self._owners.items():
                if asked.intersection(uids):
                    saved["owners"].append((list(key), list(uids)))
        return saved

    def restore(self, saved: Saved, now: float) -> None:
        """Take back what :meth:`export` saved (requests past the age bound are dropped)."""
        oldest = now - KEPT_AGE_S
        # Everything is checked before anything is taken: a damaged file changes nothing.
        requests = [
            Request(
                user=User(username=r["username"], groups=tuple(r["groups"])),
                impersonated_by=r["impersonated_by"],
                audit_id=AuditID(r["audit_id"]),
                user_agent=r["user_agent"],
                source_ips=tuple(r["source_ips"]),
                person=bool(r["person"]),
                at=float(r["at"]),
            )
            for r in saved["requests"]
        ]
        objects = [(_object_key(key), requests[i]) for key, i in saved["objects"]]
        uids = [(str(uid), requests[i]) for uid, i in saved["uids"]]
        owners = [(_object_key(key), tuple(map(str, of))) for key, of in saved["owners"]]
        for key, request in objects:
            if request.at >= oldest:
                self._by_object.put(key, request)
        for uid, request in uids:
            if request.at >= oldest:
                self._by_uid.put(uid, request)
        for key, of in owners:
            self._owners.put(key, of)


def _object_key(parts: list[str]) -> ObjectKey:
    cluster, group, resource, namespace, name = map(str, parts)
    return (cluster, group, resource, namespace, name)
