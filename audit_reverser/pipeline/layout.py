"""Where an object lives in Git: ``{path}/{group}/{version}/{resource}/{namespace}/{name}.yaml``,
with ``{path}/{cluster}/...`` for an event of a named cluster when the rules serve several
clusters (docs/fleet.md).

Every component is checked against what Kubernetes itself allows, so a forged objectRef
(``..``, ``/``, NUL) can never place a file outside the GitTarget's folder.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from audit_reverser.errors import PermanentError

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_VERSION = re.compile(r"^[a-z0-9]{1,63}$")
# Object names: Kubernetes' path-segment rule (RBAC names such as system:controller:x are
# legal), plus no control characters or leading dot, which would make hidden files.
_OBJECT_NAME = re.compile(r"^[^/%\x00-\x1f\x7f.][^/%\x00-\x1f\x7f]{0,252}$")
# The name in /audit-webhook/{cluster} (and replay --cluster): it may become a folder, so it
# never starts or ends with a dot and has no slash.
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class InvalidName(PermanentError):
    """A name in the event cannot be a Kubernetes name; nothing is written for it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectPath:
    """The file of one object, relative to the repository root, and its commit subject."""

    file: str
    subject: str  # relative to the target path, without the .yaml suffix
    sops_config: str  # the target folder's .sops.yaml


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.match(value):
        shown = repr(value) if len(value) <= 80 else repr(value[:77]) + "..."
        raise InvalidName(f"{what} {shown} is not a valid Kubernetes {what}")
    return value


def check_reference(
    *, api_group: str, api_version: str, resource: str, namespace: str, name: str
) -> list[str]:
    """The checked path parts of an object reference (the name may still be unknown)."""
    parts = _checked_parts(api_group, api_version, resource, namespace)
    if name:
        return [*parts, _check(_OBJECT_NAME, name, "name")]
    return list(parts)


# The group, version, resource and namespace of the objects written repeat from event to
# event, and each is checked on arrival and again for every file: a combination that passed
# is remembered (4,096 of them), so that only the name is checked again.
@functools.lru_cache(maxsize=4096)
def _checked_parts(
    api_group: str, api_version: str, resource: str, namespace: str
) -> tuple[str, ...]:
    parts = []
    if api_group:
        parts.append(_check(_DNS_SUBDOMAIN, api_group, "API group"))
    parts.append(_check(_VERSION, api_version, "API version"))
    parts.append(_check(_DNS_SUBDOMAIN, resource, "resource"))
    if namespace:
        parts.append(_check(_DNS_LABEL, namespace, "namespace"))
    return tuple(parts)


def is_secret(api_group: str, resource: str) -> bool:
    """A core Secret: written only SOPS-encrypted, as ``{name}.sops.yaml``."""
    return api_group == "" and resource == "secrets"


def object_path(
    *,
    target_path: str,
    api_group: str,
    api_version: str,
    resource: str,
    namespace: str,
    name: str,
    cluster: str = "",
) -> ObjectPath:
    """The file of one object; under ``cluster``'s folder when a cluster is given."""
    if not name:
        raise InvalidName("the object has no name")
    parts = check_reference(
        api_group=api_group,
        api_version=api_version,
        resource=resource,
        namespace=namespace,
        name=name,
    )
    if cluster:
        parts.insert(0, _check(CLUSTER_NAME, cluster, "cluster name"))
    relative = "/".join(parts)
    suffix = ".sops.yaml" if is_secret(api_group, resource) else ".yaml"
    prefix = f"{target_path}/" if target_path else ""
    folder = f"{prefix}{cluster}/" if cluster else prefix
    return ObjectPath(
        file=f"{prefix}{relative}{suffix}", subject=relative, sops_config=f"{folder}.sops.yaml"
    )


# A version folder (v1, v1beta1), told apart from a group folder (apps, example.com) so that
# a namespace named like a resource never matches another resource's folder.
_ANY_VERSION = "v[0-9]*"


CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
# A group folder: a name with a dot (every CRD's and aggregated API's group has one) or one of
# Kubernetes' own groups without. A fleet cluster's folder beside them (clusters sharing a
# target with the unnamed one, each in a folder of its name) is neither: a Namespace deleted
# in one cluster never takes another cluster's files.
_DOTLESS_GROUPS = ("apps", "autoscaling", "batch", "extensions", "policy")
_GROUP_FOLDERS = ("*.*", *_DOTLESS_GROUPS)


def contents_patterns(
    *, target_path: str, api_group: str, resource: str, name: str, cluster: str = ""
) -> tuple[str, ...]:
    """Folders (fnmatch segments) whose files go with this object: every version of a CRD's
    resource, every object of a Namespace; () for other objects. Within ``cluster``'s
    folder when a cluster is given."""
    prefix = f"{target_path}/" if target_path else ""
    if cluster:
        prefix = f"{prefix}{_check(CLUSTER_NAME, cluster, 'cluster name')}/"
    if (api_group, resource) == CRDS:
        plural, _, group = name.partition(".")
        if not _DNS_LABEL.match(plural) or not _DNS_SUBDOMAIN.match(group):
            return ()
        return (f"{prefix}{group}/*/{plural}",)
    if (api_group, resource) == ("", "namespaces") and _DNS_LABEL.match(name):
        return (
            f"{prefix}{_ANY_VERSION}/*/{name}",
            *(f"{prefix}{group}/{_ANY_VERSION}/*/{name}" for group in _GROUP_FOLDERS),
        )
    return ()
