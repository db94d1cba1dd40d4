"""What an event did to which objects, from the event alone.

The object is the ``responseObject`` (never the ``requestObject``: for a patch that is the
patch). Deletions follow the apiserver: an object held by finalizers (or a graceful period)
still exists; the update that removes the last finalizer of a deleted object makes it gone.
A Namespace is also held by its ``spec.finalizers`` (the namespace controller empties them
through the ``finalize`` subresource once the namespace's contents are deleted). When the
event does not say enough (Metadata level, subresource writes, a delete without a body),
:class:`NeedsApi` is raised: the object must be read from the cluster, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from audit_reverser.events import JSON_OBJECT, AuditEvent, ObjectRef


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectChange:
    """The state of one object after the event: its body, or None when it is gone."""

    namespace: str
    name: str
    body: Mapping[str, Any] | None
    resource_version: str


# Writes through these subresources answer with the whole parent object: they can finish a
# deletion (the apiserver releases a CRD through ``status``, the namespace controller a
# Namespace through ``finalize``), though they are never commits of their own.
BOOKKEEPING_SUBRESOURCES = frozenset({"status", "finalize"})


class NeedsApi(Exception):
    """The event alone cannot tell the object's new state; the reason says why."""


class UnknownResource(Exception):
    """The API does not serve the resource an event names (a CRD removed, a typo)."""


class ObjectSource(Protocol):
    """Where objects come from when the event does not carry them: the cluster's API."""

    async def read(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        """The object ``ref`` names (the parent of a subresource), as it is now; None
        when it does not exist."""

    async def names(self, ref: ObjectRef) -> set[str]:
        """The names of the objects of ``ref``'s resource in its namespace, now."""


def resolve_from_api(
    event: AuditEvent, current: Mapping[str, Any] | None, *, deleting: bool = False
) -> list[ObjectChange]:
    """The event's change, given the object as the API holds it now (None: it is gone).

    A create or update whose object is already gone changes nothing we could write: the
    content is never invented, and the delete that removed it comes as its own event. When
    its deletion was asked for (``deleting``), though, an update after which it is gone is
    the one that finished it.
    """
    ref = event.object_ref
    assert ref is not None and ref.name
    if current is None:
        if event.verb == "delete" or deleting:
            return [
                ObjectChange(namespace=ref.namespace, name=ref.name, body=None, resource_version="")
            ]
        return []
    if not _is_object(current):
        return []
    return [_change(ref, current, gone=is_gone(current))]


def metadata_of(obj: object) -> Mapping[str, Any]:
    """An object's ``metadata``, empty when it has none (or is not an object)."""
    metadata = obj.get("metadata") if isinstance(obj, JSON_OBJECT) else None
    return metadata if isinstance(metadata, JSON_OBJECT) else {}


def _is_object(obj: object) -> bool:
    if not isinstance(obj, JSON_OBJECT) or obj.get("kind") == "Status":
        return False
    name = metadata_of(obj).get("name")
    return isinstance(name, str) and bool(name)


def _held(obj: Mapping[str, Any]) -> bool:
    """True when a deleted object still exists: finalizers or a graceful deletion pending."""
    metadata = metadata_of(obj)
    grace = metadata.get("deletionGracePeriodSeconds")
    spec = obj.get("spec") if obj.get("kind") == "Namespace" else None
    return (
        bool(metadata.get("finalizers"))
        or (isinstance(grace, int) and grace > 0)
        or (isinstance(spec, JSON_OBJECT) and bool(spec.get("finalizers")))
    )


def is_gone(obj: Mapping[str, Any]) -> bool:
    """True when ``obj``, as a write answered it, no longer exists: deleted and not held."""
    return bool(metadata_of(obj).get("deletionTimestamp")) and not _held(obj)


def _change(ref: ObjectRef, obj: Mapping[str, Any], *, gone: bool) -> ObjectChange:
    metadata = metadata_of(obj)
    namespace = metadata.get("namespace")
    rv = metadata.get("resourceVersion")
    return ObjectChange(
        namespace=namespace if isinstance(namespace, str) and namespace else ref.namespace,
        name=str(metadata["name"]),
        body=None if gone else obj,
        resource_version=rv if isinstance(rv, str) else "",
    )


def resolve_offline(event: AuditEvent) -> list[ObjectChange]:
    ref = event.object_ref
    if ref is None:
        raise NeedsApi("the event names no object")
    body = event.response_object
    if ref.subresource in BOOKKEEPING_SUBRESOURCES and body is not None and _is_object(body):
        return [_change(ref, body, gone=is_gone(body))]
    if ref.subresource:
        raise NeedsApi(
            f"a write to the {ref.subresource!r} subresource: the parent object "
            "must be read from the API"
        )
    if event.verb == "deletecollection":
        items = body.get("items") if body is not None else None
        if not isinstance(items, list):
            raise NeedsApi("deletecollection without the list of deleted objects")
        # An item still held stays as it is: the list may hold only its metadata (the
        # namespace controller asks for PartialObjectMetadata), never the object to write.
        return [
            _change(ref, item, gone=True) for item in items if _is_object(item) and not _held(item)
        ]
    if body is None:
        raise NeedsApi(f"no responseObject (audit level {event.level or 'unknown'})")
    if event.verb == "delete":
        if body.get("kind") == "Status" and body.get("status") == "Success" and ref.name:
            return [
                ObjectChange(namespace=ref.namespace, name=ref.name, body=None, resource_version="")
            ]
        if _is_object(body):
            return [_change(ref, body, gone=not _held(body))]
        raise NeedsApi("delete whose response is neither the object nor a success Status")
    if not _is_object(body) or not body.get("apiVersion") or not body.get("kind"):
        raise NeedsApi("the responseObject is not a complete object")
    return [_change(ref, body, gone=is_gone(body))]
