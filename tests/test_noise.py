"""Changes that are not commits: the control plane's own writes, tools the user excludes,
objects a controller generates from an owner that is in Git already."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audit_reverser.pipeline.filter import Skip
from audit_reverser.pipeline.noise import Exclusions
from tests.conftest import configmap, event, start_harness

NAMED_REPLICASETS = """---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: replicasets}
spec:
  targetRef: {name: live, namespace: team}
  rules:
    - scope: Namespaced
      apiGroups: [apps]
      resources: [replicasets]
"""


def replicaset(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": name,
            "namespace": "default",
            "resourceVersion": "12",
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "controller": True}
            ],
        },
        "spec": {"replicas": 2},
    }


def _replicaset_event(name: str) -> dict[str, Any]:
    return event(
        "create",
        resource="replicasets",
        group="apps",
        name=name,
        body=replicaset(name),
        user="system:serviceaccount:apps:my-operator",
    )


async def test_the_control_planes_own_writes_are_skipped_by_default(tmp_path: Path) -> None:
    harness = await start_harness(tmp_path)
    try:
        for user in (
            "system:serviceaccount:kube-system:deployment-controller",
            "system:kube-controller-manager",
            "system:node:worker-1",
        ):
            await harness.send(
                event("update", name=user.split(":")[-1], body=configmap(), user=user)
            )
        await harness.send(event("create", body=configmap(), user="alice@example.com"))
        await harness.sync()
        assert await harness.log("%an") == ["alice@example.com"]
        assert harness.runtime.stats.skipped[Skip.EXCLUDED_USER] == 3
    finally:
        await harness.runtime.close()


async def test_excluded_tools_by_user_or_field_manager_make_no_commit(tmp_path: Path) -> None:
    exclusions = Exclusions(
        users=("system:serviceaccount:flux-system:*",), field_managers=("kustomize-*",)
    )
    harness = await start_harness(tmp_path, settings={"exclusions": exclusions})
    try:
        flux = event("create", name="a", body=configmap("a"))
        flux["user"] = {"username": "system:serviceaccount:flux-system:kustomize-controller"}
        impersonating = event(  # the tool impersonates a tenant: still the tool's change
            "create",
            name="b",
            body=configmap("b"),
            user="system:serviceaccount:flux-system:helm-controller",
            impersonated="system:serviceaccount:tenant:deployer",
        )
        applied = event(
            "patch", name="c", body=configmap("c"), query="fieldManager=kustomize-controller"
        )
        by_hand = event("patch", name="d", body=configmap("d"), query="fieldManager=kubectl-edit")
        await harness.send(flux, impersonating, applied, by_hand)
        await harness.sync()
        assert await harness.files() == ["live/v1/configmaps/default/d.yaml"]
        skipped = harness.runtime.stats.skipped
        assert (skipped[Skip.EXCLUDED_USER], skipped[Skip.EXCLUDED_FIELD_MANAGER]) == (2, 1)
    finally:
        await harness.runtime.close()


async def test_controller_owned_objects_are_written_only_when_a_rule_names_them(
    tmp_path: Path,
) -> None:
    harness = await start_harness(tmp_path / "wildcard")  # the '*' rule only
    try:
        await harness.send(_replicaset_event("web-1"))
        await harness.sync()
        assert await harness.files() == []
        assert harness.runtime.stats.skipped[Skip.CONTROLLED] == 1
    finally:
        await harness.runtime.close()

    harness = await start_harness(tmp_path / "named", documents=NAMED_REPLICASETS)
    try:
        await harness.send(_replicaset_event("web-1"))
        await harness.sync()
        assert await harness.files() == ["live/apps/v1/replicasets/default/web-1.yaml"]
    finally:
        await harness.runtime.close()


FLUX_EXCLUDED = """---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: manual-only, namespace: default}
spec:
  targetRef: {name: manual}
  excludeUsers: ["system:serviceaccount:flux-system:*"]
  excludeFieldManagers: ["kustomize-*"]
  rules: [{resources: [configmaps]}]
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {name: manual, namespace: default}
spec: {providerRef: {name: origin}, branch: main, path: manual}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {name: origin, namespace: default}
spec: {url: "REMOTE", allowedBranches: [main]}
"""


async def test_a_rule_can_exclude_users_and_field_managers_for_its_target_only(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "remote.git"
    documents = FLUX_EXCLUDED.replace("REMOTE", f"file://{remote}")
    harness = await start_harness(tmp_path, documents=documents)
    try:
        flux = event(
            "create", name="a", body=configmap("a"), user="system:serviceaccount:flux-system:kc"
        )
        applied = event(
            "patch", name="b", body=configmap("b"), query="fieldManager=kustomize-controller"
        )
        manual = event("create", name="c", body=configmap("c"))
        await harness.send(flux, applied, manual)
        await harness.sync()
        # 'live' (the catch-all rule) takes all three; 'manual' only the change made by hand.
        assert await harness.files() == [
            "live/v1/configmaps/default/a.yaml",
            "live/v1/configmaps/default/b.yaml",
            "live/v1/configmaps/default/c.yaml",
            "manual/v1/configmaps/default/c.yaml",
        ]
    finally:
        await harness.runtime.close()
