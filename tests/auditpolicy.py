"""Kubernetes audit policies, as the kube-apiserver applies them, for testing ours.

:func:`check` refuses what the apiserver's policy loader refuses (unknown fields, levels or
stages; a rule with both resources and nonResourceURLs; wildcards inside URLs), and
:func:`apply` makes of a full-detail event what the webhook backend would send under a
policy: nothing (level None or an omitted stage), or the event at the first matching rule's
level with the bodies that level keeps. Matching follows k8s.io/apiserver/pkg/audit/policy:
users and userGroups against the authenticated (not impersonated) user, verbs, namespaces,
group resources with ``*``, ``res/sub``, ``*/sub``, ``res/*`` and resourceNames, and
nonResourceURLs with a trailing ``*``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

LEVELS = ("None", "Metadata", "Request", "RequestResponse")
STAGES = {"RequestReceived", "ResponseStarted", "ResponseComplete", "Panic"}
POLICY_FIELDS = {"apiVersion", "kind", "metadata", "rules", "omitStages", "omitManagedFields"}
RULE_FIELDS = {
    "level",
    "users",
    "userGroups",
    "verbs",
    "resources",
    "namespaces",
    "nonResourceURLs",
    "omitStages",
    "omitManagedFields",
}
GROUP_RESOURCE_FIELDS = {"group", "resources", "resourceNames"}


def check(policy: Mapping[str, Any]) -> None:
    """Raise AssertionError for what the apiserver would refuse to start with."""
    assert policy["apiVersion"] == "audit.k8s.io/v1" and policy["kind"] == "Policy"
    assert set(policy) <= POLICY_FIELDS, set(policy) - POLICY_FIELDS
    assert set(policy.get("omitStages", ())) <= STAGES
    assert policy["rules"], "a policy without rules logs nothing"
    for number, rule in enumerate(policy["rules"]):
        where = f"rule {number}"
        assert set(rule) <= RULE_FIELDS, (where, set(rule) - RULE_FIELDS)
        assert rule["level"] in LEVELS, where
        assert set(rule.get("omitStages", ())) <= STAGES, where
        assert not (rule.get("resources") and rule.get("nonResourceURLs")), where
        assert not (rule.get("namespaces") and rule.get("nonResourceURLs")), where
        for url in rule.get("nonResourceURLs", ()):
            assert url == "*" or (url.startswith("/") and "*" not in url[:-1]), (where, url)
        for group_resource in rule.get("resources", ()):
            assert set(group_resource) <= GROUP_RESOURCE_FIELDS, where
            assert isinstance(group_resource.get("group", ""), str), where
            for resource in group_resource.get("resources", ()):
                assert resource.count("/") <= 1, (where, resource)


def _resource_matches(rule: Mapping[str, Any], ref: Mapping[str, Any]) -> bool:
    group_resources = rule.get("resources")
    if not group_resources:
        return True
    group = ref.get("apiGroup") or ""
    resource = ref.get("resource") or ""
    subresource = ref.get("subresource") or ""
    combined = f"{resource}/{subresource}" if subresource else resource
    for group_resource in group_resources:
        if group_resource.get("group", "") != group:
            continue
        listed = group_resource.get("resources") or []
        if not listed:
            return True
        names = group_resource.get("resourceNames") or []
        if names and ref.get("name") not in names:
            continue
        for entry in listed:
            if entry in ("*", combined):
                return True
            if subresource and entry.startswith("*/") and entry[2:] == subresource:
                return True
            if entry.endswith("/*") and entry[:-2] == resource:
                return True
    return False


def _matches(rule: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    user = event.get("user") or {}
    if rule.get("users") and user.get("username") not in rule["users"]:
        return False
    if rule.get("userGroups") and not set(rule["userGroups"]) & set(user.get("groups") or []):
        return False
    if rule.get("verbs") and event.get("verb") not in rule["verbs"]:
        return False
    ref = event.get("objectRef")
    if ref is None:  # a non-resource request
        if rule.get("resources") or rule.get("namespaces"):
            return False
        urls = rule.get("nonResourceURLs")
        if not urls:
            return True
        path = str(event.get("requestURI", "")).split("?")[0]
        return any(
            url == "*" or url == path or (url.endswith("*") and path.startswith(url[:-1]))
            for url in urls
        )
    if rule.get("nonResourceURLs"):
        return False
    if rule.get("namespaces") and (ref.get("namespace") or "") not in rule["namespaces"]:
        return False
    return _resource_matches(rule, ref)


def level_of(policy: Mapping[str, Any], event: Mapping[str, Any]) -> str:
    """The level the first matching rule gives, None when none matches."""
    for rule in policy["rules"]:
        if _matches(rule, event):
            return str(rule["level"])
    return "None"


def apply(policy: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the webhook backend sends of a full-detail event under ``policy``."""
    for rule in policy["rules"]:
        if _matches(rule, event):
            break
    else:
        return None
    omitted = set(policy.get("omitStages", ())) | set(rule.get("omitStages", ()))
    if rule["level"] == "None" or event.get("stage") in omitted:
        return None
    sent = copy.deepcopy(dict(event))
    sent["level"] = rule["level"]
    if rule["level"] == "Metadata":
        sent.pop("requestObject", None)
    if rule["level"] in ("Metadata", "Request"):
        sent.pop("responseObject", None)
    if rule.get("omitManagedFields", policy.get("omitManagedFields", False)):
        for key in ("requestObject", "responseObject"):
            body = sent.get(key)  # a JSON patch request is a list
            metadata = body.get("metadata") if isinstance(body, dict) else None
            if isinstance(metadata, dict):
                metadata.pop("managedFields", None)
    return sent
