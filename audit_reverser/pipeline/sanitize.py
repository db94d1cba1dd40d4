"""Remove what the server owns, keep everything the user wrote.

This is a deny-list on purpose: an allow-list of fields loses whatever it did not foresee
(StorageClass ``provisioner``, RBAC ``rules``, PriorityClass ``value``...), and the folder in
Git must be deployable as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

SERVER_METADATA = frozenset(
    (
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
        "ownerReferences",
    )
)

# Annotations the apiserver or its controllers write for their own bookkeeping.
SERVER_ANNOTATIONS = frozenset(
    (
        "kubectl.kubernetes.io/last-applied-configuration",
        "deployment.kubernetes.io/revision",
        "pv.kubernetes.io/bind-completed",
        "pv.kubernetes.io/bound-by-controller",
    )
)

# Labels the Job controller puts on generated selectors; applying them back is refused
# unless spec.manualSelector is true.
_JOB_SELECTOR_LABELS = (
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "job-name",
    "batch.kubernetes.io/job-name",
)


def _drop_service_ips(spec: dict[str, Any]) -> None:
    # A headless Service's clusterIP "None" is the user's choice and must stay.
    if spec.get("clusterIP") not in (None, "None"):
        spec.pop("clusterIP", None)
        spec.pop("clusterIPs", None)


def _drop_job_selector(spec: dict[str, Any]) -> None:
    if spec.get("manualSelector"):
        return
    spec.pop("selector", None)
    template = spec.get("template")
    metadata = template.get("metadata") if isinstance(template, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("labels"), dict):
        return
    labels = metadata["labels"]
    for label in _JOB_SELECTOR_LABELS:
        labels.pop(label, None)
    if not labels:
        del metadata["labels"]


_SPEC_FIXUPS = {
    ("", "services"): _drop_service_ips,
    ("batch", "jobs"): _drop_job_selector,
}


def sanitize(obj: Mapping[str, Any], *, api_group: str, resource: str) -> dict[str, Any]:
    """``obj`` without status and server-owned metadata and spec fields.

    A new object that shares with ``obj`` whatever it does not change (a deep copy cost as
    much as the rest of a kept write's pipeline): neither may be modified afterwards."""
    clean = dict(obj)
    clean.pop("status", None)
    metadata = clean.get("metadata")
    if isinstance(metadata, dict):
        metadata = clean["metadata"] = {
            k: v for k, v in metadata.items() if k not in SERVER_METADATA
        }
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict):
            annotations = {k: v for k, v in annotations.items() if k not in SERVER_ANNOTATIONS}
            if annotations:
                metadata["annotations"] = annotations
            else:
                del metadata["annotations"]
        if "name" in metadata:
            metadata.pop("generateName", None)
    fixup = _SPEC_FIXUPS.get((api_group, resource))
    spec = clean.get("spec")
    if fixup is not None and isinstance(spec, dict):
        clean["spec"] = spec = copy.deepcopy(spec)
        fixup(spec)
    return clean
