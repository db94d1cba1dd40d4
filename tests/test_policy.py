"""The audit policies in policy/: valid for the apiserver, and audit-reverser keeps what each
lets through.

A day in a cluster (people, a GitOps tool, the control plane, kubelets, operators) plus the
real-world corpus is written once at full detail. Each policy is applied as the apiserver's
webhook backend would (tests/auditpolicy.py); what it sends goes through the pipeline with
the cluster's API behind it, and must give the same commits (subject and author) and the
same files as the full-detail events. The API here answers with the object as it was right
after each event (events are sent one at a time), so the comparison is about what each
policy carries, not about read timing (which policy/minimal.yaml documents).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from audit_reverser.encryption import age, sops
from audit_reverser.events import ObjectRef
from tests.auditpolicy import apply, check, level_of
from tests.conftest import CORPUS, REPO_ROOT, configmap, event, git, start_harness

POLICIES = REPO_ROOT / "policy"
Key = tuple[str, str, str, str]  # group, resource, namespace, name
CRDS = "customresourcedefinitions"


def _key(ref: Mapping[str, Any]) -> Key:
    return (
        ref.get("apiGroup") or "",
        ref.get("resource") or "",
        ref.get("namespace") or "",
        ref.get("name") or "",
    )


@dataclass
class Step:
    """One request as it happened: the full-detail event, and the object it left behind
    (the parent's, for a subresource write) when it changed one."""

    event: dict[str, Any]
    after: dict[str, Any] | None = None
    gone: tuple[Key, ...] = ()  # objects the request made disappear (besides a delete's own)


@dataclass
class ApiAtEvent:
    """The cluster's API, holding each object as the last event sent left it."""

    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    reads: list[Key] = field(default_factory=list)

    async def read(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        key = (ref.api_group, ref.resource, ref.namespace, ref.name)
        self.reads.append(key)
        return self.objects.get(key)

    async def names(self, ref: ObjectRef) -> set[str]:
        wanted = (ref.api_group, ref.resource, ref.namespace)
        return {key[3] for key in self.objects if key[:3] == wanted}


_times = (f"2026-11-25T10:{m:02d}:{s:02d}.000000Z" for m in range(60) for s in range(0, 60, 5))
_rv = itertools.count(100)


def _obj(kind: str, api_version: str, name: str, namespace: str | None, **rest: Any) -> Any:
    metadata: dict[str, Any] = {"name": name, "resourceVersion": str(next(_rv))}
    if namespace:
        metadata["namespace"] = namespace
    metadata["managedFields"] = [{"manager": "kubectl", "operation": "Update"}]
    return {"kind": kind, "apiVersion": api_version, "metadata": metadata, **rest}


def _step(
    verb: str,
    after: dict[str, Any] | None = None,
    *,
    response: dict[str, Any] | None = None,
    gone: tuple[Key, ...] = (),
    **options: Any,
) -> Step:
    """A full-detail (RequestResponse) event; ``response`` when it is not ``after``."""
    body = response if response is not None else after
    item = event(verb, body=body, request=body, time=next(_times), **options)
    return Step(item, after, gone)


def _deleting(obj: dict[str, Any], *finalizers: str) -> Any:
    """``obj`` as a write answers once its deletion was asked for: gone without finalizers."""
    metadata = {k: v for k, v in obj["metadata"].items() if k != "finalizers"}
    metadata.update(resourceVersion=str(next(_rv)), deletionTimestamp="2026-11-25T11:00:00Z")
    if finalizers:
        metadata["finalizers"] = list(finalizers)
    return {**obj, "metadata": metadata}


def _deployment(replicas: int, image: str = "web:1") -> Any:
    return _obj(
        "Deployment",
        "apps/v1",
        "web",
        "default",
        spec={"replicas": replicas, "template": {"spec": {"containers": [{"image": image}]}}},
    )


def _secret(password: str) -> Any:
    return _obj("Secret", "v1", "db", "default", data={"password": password})


SA = "system:serviceaccount"
NODE = {"user": "system:node:worker-1", "groups": ["system:nodes", "system:authenticated"]}
ARGO = {
    "user": f"{SA}:argocd:argocd-application-controller",
    "groups": ["system:serviceaccounts", "system:serviceaccounts:argocd", "system:authenticated"],
}
APPS = {"resource": "deployments", "group": "apps", "name": "web"}
KUBE_SYSTEM = ["system:serviceaccounts", "system:serviceaccounts:kube-system"]
CRD = {
    "resource": CRDS,
    "group": "apiextensions.k8s.io",
    "namespace": None,
    "name": "widgets.example.com",
}
TEAM_A = {"resource": "namespaces", "namespace": None, "name": "team-a"}
PVC = {"resource": "persistentvolumeclaims", "name": "data"}


def deletions_the_control_plane_finishes(crd: dict[str, Any]) -> list[Step]:
    """People delete; controllers (and the apiserver) make the objects disappear."""
    claim = _obj("PersistentVolumeClaim", "v1", "data", "default", spec={"volumeName": "pv-1"})
    claim["metadata"]["finalizers"] = ["kubernetes.io/pvc-protection"]
    widget = _obj("Widget", "example.com/v1", "w1", "default", spec={"size": 1})
    settings = configmap("settings", "team-a")
    team_a = _obj("Namespace", "v1", "team-a", None, spec={"finalizers": ["kubernetes"]})
    return [
        _step("create", claim, **PVC),
        _step("delete", _deleting(claim, "kubernetes.io/pvc-protection"), **PVC, user="bob"),
        _step(
            "update",
            None,
            response=_deleting(claim),
            **PVC,
            user=f"{SA}:kube-system:pvc-protection-controller",
            groups=KUBE_SYSTEM,
            gone=(("", "persistentvolumeclaims", "default", "data"),),
        ),
        _step("create", widget, resource="widgets", group="example.com", name="w1"),
        _step("delete", _deleting(crd, "customresourcecleanup.apiextensions.k8s.io"), **CRD),
        _step(  # the instances go in storage, with no events, then the CRD through status
            "update",
            None,
            response=_deleting(crd),
            **CRD,
            subresource="status",
            user="system:apiserver",
            groups=["system:masters"],
            gone=(("apiextensions.k8s.io", CRDS, "", "widgets.example.com"),),
        ),
        _step("create", settings, namespace="team-a", name="settings"),
        _step("delete", _deleting(team_a), **TEAM_A, user="carol"),
        _step(  # (its deletecollections, per resource: see tests/test_deletions.py)
            "update",
            None,
            response={**_deleting(team_a), "spec": {}},
            **TEAM_A,
            subresource="finalize",
            user=f"{SA}:kube-system:namespace-controller",
            groups=KUBE_SYSTEM,
            gone=(("", "namespaces", "", "team-a"), ("", "configmaps", "team-a", "settings")),
        ),
    ]


def a_day_in_a_cluster() -> list[Step]:
    """Every kind of request a cluster sees, in order."""
    status = {"kind": "Status", "apiVersion": "v1", "status": "Success"}
    scale = {"kind": "Scale", "apiVersion": "autoscaling/v1", "spec": {"replicas": 5}}
    crd = _obj(
        "CustomResourceDefinition",
        "apiextensions.k8s.io/v1",
        "widgets.example.com",
        None,
        spec={"group": "example.com", "names": {"plural": "widgets", "kind": "Widget"}},
    )
    return [
        _step("create", configmap("app", data={"mode": "a"}), name="app"),
        _step("get", configmap("app"), name="app"),
        _step("list", None, name=None),
        _step("watch", None, name=None),
        _step(
            "update",
            configmap("app", data={"mode": "b"}),
            name="app",
            user="alice@example.com",
            impersonated="bob@example.com",
        ),
        _step("create", _deployment(2), **APPS),
        _step("patch", _deployment(5), response=scale, subresource="scale", **APPS),
        _step("patch", _deployment(7, "web:2"), **APPS, **ARGO),
        _step("create", _secret("czNjcjN0"), resource="secrets", name="db"),
        _step("patch", _secret("bjN3LXMzY3IzdA=="), resource="secrets", name="db"),
        _step(
            "create",
            _obj("Namespace", "v1", "team-a", None),
            resource="namespaces",
            namespace=None,
            name="team-a",
        ),
        _step(
            "create",
            crd,
            resource=CRDS,
            group="apiextensions.k8s.io",
            namespace=None,
            name="widgets.example.com",
        ),
        # The control plane and the nodes at work.
        _step(
            "create",
            _obj("ReplicaSet", "apps/v1", "web-6d4b", "default"),
            resource="replicasets",
            group="apps",
            name="web-6d4b",
            user="system:serviceaccount:kube-system:deployment-controller",
            groups=["system:serviceaccounts", "system:serviceaccounts:kube-system"],
        ),
        _step(
            "update",
            _obj("Lease", "coordination.k8s.io/v1", "kube-scheduler", "kube-system"),
            resource="leases",
            group="coordination.k8s.io",
            namespace="kube-system",
            name="kube-scheduler",
            user="system:kube-scheduler",
        ),
        _step(
            "patch",
            _obj("Pod", "v1", "web-6d4b-x", "default"),
            resource="pods",
            name="web-6d4b-x",
            subresource="status",
            **NODE,
        ),
        _step(
            "create",
            _obj("Event", "v1", "web.1", "default"),
            resource="events",
            name="web.1",
            **NODE,
        ),
        _step(
            "update",
            _obj("Endpoints", "v1", "web", "default"),
            resource="endpoints",
            name="web",
            user="system:kube-controller-manager",
        ),
        # Requests that are not state, status reports of operators and of audit-reverser.
        _step(
            "create",
            None,
            response={"kind": "Status", "apiVersion": "v1", "status": "Success"},
            resource="pods",
            name="web-6d4b-x",
            subresource="exec",
        ),
        _step(
            "create",
            _obj("TokenReview", "authentication.k8s.io/v1", "", None),
            resource="tokenreviews",
            group="authentication.k8s.io",
            namespace=None,
            name=None,
            user="system:serviceaccount:monitoring:prometheus",
        ),
        _step(
            "update",
            _obj("Certificate", "cert-manager.io/v1", "web-tls", "default"),
            resource="certificates",
            group="cert-manager.io",
            name="web-tls",
            subresource="status",
            user=f"{SA}:cert-manager:cert-manager",
        ),
        _step(
            "patch",
            _obj("GitTarget", "configbutler.ai/v1alpha1", "live", "default"),
            resource="gittargets",
            group="configbutler.ai",
            version="v1alpha1",
            name="live",
            subresource="status",
            user=f"{SA}:audit-reverser:audit-reverser",
        ),
        # And the end of the app's config.
        _step("delete", None, response=status, name="app"),
        *deletions_the_control_plane_finishes(crd),
    ]


def _non_resource(path: str) -> dict[str, Any]:
    item = event("get", time=next(_times), **NODE)
    del item["objectRef"]
    item["requestURI"] = path
    return item


def _steps() -> list[Step]:
    steps = a_day_in_a_cluster()
    steps.append(Step(_non_resource("/healthz")))
    steps.append(Step(_non_resource("/apis/apps/v1")))
    for path in sorted(CORPUS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            item = json.loads(line)
            item.pop("kind", None)  # as the webhook sends them
            item.pop("apiVersion", None)
            body = item.get("responseObject")
            if item.get("verb") in ("delete", "deletecollection"):
                steps.append(Step(item, None))
            else:
                steps.append(Step(item, body if isinstance(body, dict) else None))
    return steps


async def _run(
    tmp_path: Path, steps: list[Step], policy: Mapping[str, Any] | None, identity: age.Identity
) -> Any:
    api = ApiAtEvent()
    encryption = (
        "\n  encryption:\n    provider: sops\n"
        f"    age: {{enabled: true, recipients: {{publicKeys: [{identity.recipient}]}}}}"
    )
    harness = await start_harness(tmp_path, source=api, encryption=encryption)
    sent = 0
    try:
        for step in steps:
            if step.after is not None and step.event.get("objectRef"):
                api.objects[_key(step.event["objectRef"])] = step.after
            elif step.event["verb"] == "delete":
                api.objects.pop(_key(step.event["objectRef"]), None)
            for key in step.gone:
                api.objects.pop(key, None)
            item = step.event if policy is None else apply(policy, step.event)
            if item is not None:
                sent += 1
                await harness.send(item)
                await harness.runtime.intake.drain()
        await harness.sync()
        commits = await harness.log("%an|%s")
        files = {}
        for name in await harness.files():
            text = await harness.show(name)
            if name.endswith(".sops.yaml") and not name.endswith("/.sops.yaml"):
                plain = sops.decrypt(sops.load(text), [identity])
                text = yaml.safe_dump({k: v for k, v in plain.items() if k != "sops"})
            files[name] = text
        tree = await asyncio.to_thread(git, harness.remote, "log", "-1", "--format=%T", "main")
    finally:
        await harness.runtime.close()
    return commits, files, tree, sent, api.reads


@pytest.mark.parametrize("name", ["recommended.yaml", "minimal.yaml"])
def test_the_policy_is_one_the_apiserver_accepts(name: str) -> None:
    check(yaml.safe_load((POLICIES / name).read_text()))


def test_every_policy_file_is_tested() -> None:
    assert sorted(p.name for p in POLICIES.iterdir()) == ["minimal.yaml", "recommended.yaml"]


@pytest.mark.parametrize("name", ["recommended.yaml", "minimal.yaml"])
async def test_the_pipeline_keeps_what_the_policy_lets_through(tmp_path: Path, name: str) -> None:
    policy = yaml.safe_load(await asyncio.to_thread((POLICIES / name).read_text))
    steps = await asyncio.to_thread(_steps)
    identity = age.Identity.generate()
    commits, files, _, everything, _ = await _run(tmp_path / "full", steps, None, identity)
    assert len(commits) >= 8  # the day's changes are commits, and some of the corpus's
    assert any(f.endswith("secrets/default/db.sops.yaml") for f in files)
    assert "alice@example.com|[CREATE] v1/configmaps/default/app" in commits
    assert any(c.startswith("bob@example.com|[UPDATE]") for c in commits)  # impersonated
    assert "alice@example.com|[UPDATE] apps/v1/deployments/default/web" in commits  # scale
    assert "bob|[DELETE] v1/persistentvolumeclaims/default/data" in commits
    assert (
        f"alice@example.com|[DELETE] apiextensions.k8s.io/v1/{CRDS}/widgets.example.com" in commits
    )
    assert "carol|[DELETE] v1/namespaces/team-a" in commits
    assert not any("widgets" in f or "team-a" in f for f in files)

    got_commits, got_files, _, sent, reads = await _run(
        tmp_path / "policy", steps, policy, identity
    )
    assert got_commits == commits
    assert got_files == files

    # What each policy costs: events sent, and the objects audit-reverser reads back.
    assert sent < everything
    day = {_key(s.event["objectRef"]) for s in steps[: len(a_day_in_a_cluster())]}
    read = {key[1] for key in reads if key in day}
    if name == "recommended.yaml":
        # Bodies come with the events; only Secrets and the scale write are read back.
        assert read == {"secrets", "deployments"}
    else:
        assert read == {
            "configmaps",
            "secrets",
            "deployments",
            "namespaces",
            CRDS,
            "persistentvolumeclaims",
            "widgets",
        }


def test_the_recommended_policy_sends_writes_whole_and_drops_noise() -> None:
    policy = yaml.safe_load((POLICIES / "recommended.yaml").read_text())
    day = a_day_in_a_cluster()

    def level(index: int) -> str:
        return level_of(policy, day[index].event)

    assert [level(i) for i in (0, 4, 5, 7, 10, 11)] == ["RequestResponse"] * 6
    assert level(8) == level(9) == "Metadata"  # Secrets: no values in the audit stream
    assert {level(i) for i in range(12, 21)} == {"None"}  # noise, status, exec
    # Deletions the control plane finishes are sent whole, whoever makes them.
    assert {level(i) for i in range(22, len(day))} == {"RequestResponse"}
    assert level(1) == level(2) == level(3) == "None"  # reads
    sent = apply(policy, day[0].event)
    assert sent is not None and "managedFields" not in sent["responseObject"]["metadata"]
