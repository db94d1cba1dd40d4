"""Kubernetes RBAC, as the kube-apiserver decides it, for checking the install manifests.

:func:`request_attributes` turns an HTTP request into what the apiserver's RequestInfo
resolver makes of it (verb, API group, resource, subresource, namespace, name), and
:class:`Authorizer` answers it from the ClusterRoles, Roles and bindings given, as the RBAC
authorizer does: a rule allows a request when verb, group, resource (``*``, ``res/sub``,
``*/sub``) and resourceNames all match; a ClusterRoleBinding grants everywhere, a RoleBinding
only in its namespace. Discovery is allowed as the built-in ``system:discovery`` role does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The built-in system:discovery ClusterRole, bound to every authenticated user.
DISCOVERY = ("/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/version")


@dataclass(frozen=True)
class Attributes:
    verb: str
    path: str
    resource_request: bool
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    def __str__(self) -> str:
        if not self.resource_request:
            return f"{self.verb} {self.path}"
        what = f"{self.group or 'core'}/{self.resource}"
        if self.subresource:
            what += f"/{self.subresource}"
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {what}{where} ({self.path})"


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> Attributes:
    """What the apiserver's RequestInfoFactory makes of a request."""
    parts = [p for p in path.split("/") if p]
    nonresource_verb = method.lower()
    if not parts or parts[0] not in ("api", "apis"):
        return Attributes(nonresource_verb, path, resource_request=False)
    if parts[0] == "api":
        group, rest = "", parts[2:]
        if len(parts) < 2:
            return Attributes(nonresource_verb, path, resource_request=False)
    else:
        if len(parts) < 3:
            return Attributes(nonresource_verb, path, resource_request=False)
        group, rest = parts[1], parts[3:]
    if not rest:  # discovery of one group version
        return Attributes(nonresource_verb, path, resource_request=False)
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    elif rest[0] == "namespaces" and len(rest) == 2:
        namespace = rest[1]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    verb = {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method.upper(), "get" if name else "list")
    if verb in ("get", "list") and query.get("watch") in ("true", "1"):
        verb = "watch"
    return Attributes(verb, path, True, group, resource, subresource, namespace, name)


def _matches(values: Iterable[str], wanted: str) -> bool:
    values = list(values)
    return "*" in values or wanted in values


def _rule_allows(rule: Mapping[str, Any], request: Attributes) -> bool:
    if not _matches(rule.get("verbs") or [], request.verb):
        return False
    if not request.resource_request:
        return any(
            url == request.path or (url.endswith("*") and request.path.startswith(url[:-1]))
            for url in rule.get("nonResourceURLs") or []
        )
    if not _matches(rule.get("apiGroups") or [], request.group):
        return False
    combined = request.resource + (f"/{request.subresource}" if request.subresource else "")
    resources = rule.get("resources") or []
    if not (
        "*" in resources
        or combined in resources
        or (request.subresource and f"*/{request.subresource}" in resources)
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or request.name in names


@dataclass
class Authorizer:
    """RBAC for one subject (a service account), from manifests."""

    service_account: tuple[str, str]  # namespace, name
    documents: list[dict[str, Any]]

    def _roles(self, kind: str, name: str, namespace: str) -> list[dict[str, Any]]:
        return [
            doc
            for doc in self.documents
            if doc.get("kind") == kind
            and doc["metadata"]["name"] == name
            and (kind == "ClusterRole" or doc["metadata"].get("namespace") == namespace)
        ]

    def _binds_us(self, binding: Mapping[str, Any]) -> bool:
        namespace, name = self.service_account
        return any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == name
            and s.get("namespace", binding["metadata"].get("namespace")) == namespace
            for s in binding.get("subjects") or []
        )

    def allows(self, request: Attributes) -> bool:
        if _rule_allows({"verbs": ["get"], "nonResourceURLs": DISCOVERY}, request):
            return True
        for binding in self.documents:
            kind = binding.get("kind")
            if kind not in ("ClusterRoleBinding", "RoleBinding") or not self._binds_us(binding):
                continue
            namespace = binding["metadata"].get("namespace", "")
            if kind == "RoleBinding" and request.namespace != namespace:
                continue
            ref = binding["roleRef"]
            for role in self._roles(ref["kind"], ref["name"], namespace):
                if any(_rule_allows(rule, request) for rule in role.get("rules") or []):
                    return True
        return False
