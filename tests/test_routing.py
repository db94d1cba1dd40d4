"""Which targets an event goes to, following the seed CRDs' documented rule semantics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from audit_reverser.config import load_config
from audit_reverser.events import ObjectRef, parse_event
from audit_reverser.pipeline.routing import Router
from tests.conftest import event

HEADER = """\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {name: p, namespace: team}
spec: {url: /tmp/r.git, allowedBranches: ["*"]}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {name: team, namespace: team}
spec: {providerRef: {name: p}, branch: main, path: team}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {name: platform, namespace: team}
spec: {providerRef: {name: p}, branch: main, path: platform}
"""


def router(tmp_path: Path, rules: str) -> Router:
    file = tmp_path / "c.yaml"
    file.write_text(HEADER + rules)
    return Router(load_config([file]))


def targets(r: Router, verb: str = "create", **ref: str) -> set[str]:
    ref.setdefault("api_version", "v1")
    return {route.target.key.name for route in r.routes(ObjectRef(**ref), verb)}


WATCH = """---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: w, namespace: team}
spec:
  targetRef: {name: team}
  rules: [RULES]
"""
CLUSTER = """---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: c}
spec:
  targetRef: {name: platform, namespace: team}
  rules: [RULES]
"""


def test_watch_rule_matches_only_its_own_namespace(tmp_path: Path) -> None:
    r = router(tmp_path, WATCH.replace("RULES", '{resources: ["*"]}'))
    assert targets(r, resource="configmaps", namespace="team") == {"team"}
    assert targets(r, resource="configmaps", namespace="other") == set()
    assert targets(r, resource="nodes") == set(), "cluster-scoped objects never match"
    assert targets(r, resource="namespaces", namespace="team", name="team") == set()


def test_cluster_watch_rule_matches_by_scope(tmp_path: Path) -> None:
    r = router(tmp_path, CLUSTER.replace("RULES", '{scope: Cluster, resources: ["*"]}'))
    assert targets(r, resource="nodes", name="n1") == {"platform"}
    assert targets(r, resource="namespaces", namespace="x", name="x") == {"platform"}
    assert targets(r, resource="configmaps", namespace="x") == set()


def test_one_event_goes_to_several_targets(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        WATCH.replace("RULES", '{resources: ["configmaps"]}')
        + CLUSTER.replace("RULES", '{scope: Namespaced, resources: ["*"]}'),
    )
    assert targets(r, resource="configmaps", namespace="team") == {"team", "platform"}


@pytest.mark.parametrize(
    ("rule", "ref", "verb", "expected"),
    [
        ('{resources: ["ConfigMaps"]}', {"resource": "configmaps"}, "create", True),
        ('{resources: ["pods"]}', {"resource": "pods", "subresource": "exec"}, "create", False),
        (
            '{resources: ["pods/*"]}',
            {"resource": "pods", "subresource": "ephemeralcontainers"},
            "patch",
            True,
        ),
        ('{resources: ["pods/*"]}', {"resource": "pods"}, "create", False),
        (
            '{resources: ["*/scale"]}',
            {"resource": "deployments", "api_group": "apps", "subresource": "scale"},
            "patch",
            True,
        ),
        (
            '{resources: ["deployments"]}',
            {"resource": "deployments", "api_group": "apps", "subresource": "scale"},
            "update",
            True,
        ),
        ('{resources: ["*"]}', {"resource": "pods", "subresource": "log"}, "create", False),
        (
            '{resources: ["widgets.example.com"]}',
            {"resource": "widgets", "api_group": "example.com"},
            "create",
            True,
        ),
        (
            '{apiGroups: [""], resources: ["*"]}',
            {"resource": "deployments", "api_group": "apps"},
            "create",
            False,
        ),
        (
            '{apiGroups: ["apps"], apiVersions: ["v1"], resources: ["*"]}',
            {"resource": "deployments", "api_group": "apps"},
            "create",
            True,
        ),
        (
            '{apiVersions: ["v1beta1"], resources: ["*"]}',
            {"resource": "configmaps"},
            "create",
            False,
        ),
        ('{operations: [CREATE], resources: ["*"]}', {"resource": "configmaps"}, "patch", False),
        ('{operations: [UPDATE], resources: ["*"]}', {"resource": "configmaps"}, "patch", True),
        (
            '{operations: [DELETE], resources: ["*"]}',
            {"resource": "configmaps"},
            "deletecollection",
            True,
        ),
        ('{operations: ["*"], resources: ["*"]}', {"resource": "configmaps"}, "delete", True),
    ],
)
def test_rule_patterns(
    tmp_path: Path, rule: str, ref: dict[str, str], verb: str, expected: bool
) -> None:
    r = router(tmp_path, WATCH.replace("RULES", rule))
    assert bool(targets(r, verb, namespace="team", **ref)) is expected


def test_a_fleet_s_own_rules_give_an_event_only_its_own_cluster_s_targets(
    tmp_path: Path,
) -> None:
    """What a CRD's deletion prunes its instances from: in a fleet whose rules are each
    cluster's own, staging's CRD going away must not take prod's files."""
    file = tmp_path / "c.yaml"
    file.write_text(HEADER)
    base = load_config([file])
    targets = {}
    for cluster in ("prod", "staging"):
        for key, target in base.targets.items():
            own = dataclasses.replace(key, cluster=cluster)
            targets[own] = dataclasses.replace(target, key=own)
    r = Router(dataclasses.replace(base, targets=targets, by_cluster=True))
    crd_deleted = parse_event(event("delete", name="demo"), cluster="staging")
    found = {(t.key.cluster, t.key.name, t.cluster) for t in r.every_target(crd_deleted)}
    assert found == {("staging", "team", ""), ("staging", "platform", "")}
    # Rules from files serve every cluster, each in its own folder under each target.
    shared = Router(dataclasses.replace(base, cluster_folders=True)).every_target(crd_deleted)
    assert {(t.key.name, t.cluster) for t in shared} == {
        ("team", "staging"),
        ("platform", "staging"),
    }
