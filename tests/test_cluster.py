"""Cluster mode: objects the audit events do not carry are read from the API.

The API is kmock's Kubernetes emulator, served over real HTTP to kubernetes-asyncio. kmock
gaps are filled here, in the fixtures (resourceVersions, declared resources), never in the
product.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import yaml
import yarl

from audit_reverser.cluster import rules as rules_module
from audit_reverser.cluster.api import KubeApi, WatchExpired
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.rules import ClusterRules, Collection
from audit_reverser.cluster.snapshot import snapshot
from audit_reverser.cluster.status import StatusReporter
from audit_reverser.config.model import Key
from audit_reverser.encryption import age, sops
from audit_reverser.pipeline.filter import Skip
from audit_reverser.runtime import Runtime, Settings
from tests.conftest import (
    SEED,
    Harness,
    bare_repo,
    configmap,
    event,
    event_list,
    eventually,
    git,
    git_files,
    git_show,
    request,
    start_harness,
    start_serve,
    write_config,
)
from tests.rbac import Authorizer, request_attributes
from tests.test_deploy import rbac_documents
from tests.test_flux import FLUX, FLUX_KEY, FLUX_REF, every_configmap, git_repository, target

JSON = {"Content-Type": "application/json"}
TOKEN = "test-token"
RBAC = rbac_documents()  # read here: the check runs inside the event loop


@dataclass
class Cluster:
    api: kmock.KubernetesEmulator
    client: KubeApi

    def add(self, resource: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.api.objects[resource, namespace, name] = body

    def gets(self, path: str) -> int:
        return sum(1 for request in self.api if request.url.path == path)


def _kubeconfig(url: yarl.URL) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(url).rstrip("/")}}],
        "users": [{"name": "audit-reverser", "user": {"token": TOKEN}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "audit-reverser"}}],
        "current-context": "kmock",
    }


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources["v1/configmaps"] = kmock.ResourceInfo(kind="ConfigMap", namespaced=True)
        emulator.resources["apps/v1/deployments"] = kmock.ResourceInfo(
            kind="Deployment", namespaced=True, subresources={"scale", "status"}
        )
        client = await KubeApi.from_dict(_kubeconfig(server.url))
        try:
            yield Cluster(emulator, client)
        finally:
            await client.close()
        _assert_the_install_allows_every_request(emulator)


def _assert_the_install_allows_every_request(emulator: kmock.KubernetesEmulator) -> None:
    """What audit-reverser asked of the API (not the test's own requests, which carry no
    token) is what the RBAC in deploy/ (with the example key RoleBinding) allows."""
    authorizer = Authorizer(("audit-reverser", "audit-reverser"), RBAC)
    denied = {
        str(attributes)
        for request in emulator
        if request.headers.get("Authorization") == f"Bearer {TOKEN}"
        and not authorizer.allows(
            attributes := request_attributes(request.method.value, request.url.path, request.params)
        )
    }
    assert not denied, f"deploy/base/rbac.yaml does not allow: {sorted(denied)}"


@pytest.fixture
async def harness(tmp_path: Path, cluster: Cluster) -> AsyncIterator[Harness]:
    started = await start_harness(tmp_path, source=ApiObjects(cluster.client))
    yield started
    await started.runtime.close()


def deployment(replicas: int = 3) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "default",
            "resourceVersion": "41",
            "generation": 4,
        },
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}},
        "status": {"replicas": 2},
    }


async def test_metadata_level_events_get_the_object_from_the_api(
    cluster: Cluster, harness: Harness
) -> None:
    cluster.add("v1/configmaps", "default", "demo", configmap(data={"from": "api"}))
    await harness.send(event("create", level="Metadata", body=None, user="jane@example.com"))
    await harness.sync()
    assert await harness.files() == ["live/v1/configmaps/default/demo.yaml"]
    content = await harness.show("live/v1/configmaps/default/demo.yaml")
    assert "from: api" in content and "resourceVersion" not in content  # sanitized
    assert await harness.log("%an") == ["jane@example.com"]


async def test_a_scale_write_commits_the_deployment_read_from_the_api(
    cluster: Cluster, harness: Harness
) -> None:
    cluster.add("apps/v1/deployments", "default", "web", deployment(replicas=5))
    scale = {"kind": "Scale", "apiVersion": "autoscaling/v1", "spec": {"replicas": 5}}
    await harness.send(
        event(
            "patch",
            resource="deployments",
            group="apps",
            name="web",
            subresource="scale",
            body={**scale, "metadata": {"name": "web", "namespace": "default"}},
        )
    )
    await harness.sync()
    assert await harness.files() == ["live/apps/v1/deployments/default/web.yaml"]
    content = await harness.show("live/apps/v1/deployments/default/web.yaml")
    assert "kind: Deployment" in content and "replicas: 5" in content and "status" not in content


async def test_an_object_gone_before_it_was_read_writes_nothing(
    cluster: Cluster, harness: Harness
) -> None:
    await harness.send(event("create", level="Metadata", body=None))
    await harness.sync()
    assert await harness.files() == []
    assert harness.runtime.stats.skipped[Skip.GONE] == 1


async def test_a_delete_without_a_body_removes_the_file_once_the_api_confirms(
    cluster: Cluster, harness: Harness
) -> None:
    await harness.send(event("create", body=configmap()))
    await harness.send(event("delete", level="Metadata", body=None))  # kmock: not found
    await harness.sync()
    assert await harness.subjects() == [
        "[CREATE] v1/configmaps/default/demo",
        "[DELETE] v1/configmaps/default/demo",
    ]
    assert await harness.files() == []


async def test_a_resource_installed_after_start_is_found(
    cluster: Cluster, harness: Harness
) -> None:
    crd_event = event(
        "create", resource="widgets", group="example.com", name="w1", level="Metadata", body=None
    )
    await harness.send(crd_event)
    await harness.sync()
    assert harness.runtime.stats.skipped[Skip.UNKNOWN_RESOURCE] == 1
    # The CRD is installed, then a widget is made.
    cluster.api.resources["example.com/v1/widgets"] = kmock.ResourceInfo(
        kind="Widget", namespaced=True
    )
    cluster.add(
        "example.com/v1/widgets",
        "default",
        "w1",
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w1", "namespace": "default", "resourceVersion": "9"},
            "spec": {"size": 3},
        },
    )
    await harness.send({**crd_event, "auditID": "widget-2"})
    await harness.sync()
    assert await harness.files() == ["live/example.com/v1/widgets/default/w1.yaml"]


async def test_a_burst_of_events_for_one_object_makes_one_read(
    cluster: Cluster, harness: Harness
) -> None:
    cluster.add("v1/configmaps", "default", "demo", configmap(data={"n": "1"}))
    await harness.send(
        *(event("update", level="Metadata", body=None, user=f"user-{i}") for i in range(20))
    )
    await harness.sync()
    assert cluster.gets("/api/v1/namespaces/default/configmaps/demo") == 1
    # One state answers them all: one commit, by the latest, the others co-authors.
    [entry] = await harness.log("%an%n%b")
    assert entry.splitlines()[0] == "user-19"
    co_authors = [line for line in entry.splitlines() if line.startswith("Co-authored-by: ")]
    assert co_authors == [
        f"Co-authored-by: user-{i} <user-{i}@audit-reverser.invalid>" for i in range(19)
    ]
    assert harness.runtime.stats.skipped[Skip.COALESCED] == 19


async def test_a_burst_answered_by_one_read_is_authored_by_the_latest_writer(
    cluster: Cluster, harness: Harness
) -> None:
    """Metadata level: ana changes the ConfigMap, then bob; the read shows bob's state."""
    cluster.add("v1/configmaps", "default", "demo", configmap(data={"owner": "bob"}, rv="502"))
    ana = event(
        "patch",
        level="Metadata",
        user="ana@example.com",
        audit_id="ana-1",
        time="2026-01-02T03:04:05.100000Z",
    )
    bob = event(
        "patch",
        level="Metadata",
        user="bob@example.com",
        audit_id="bob-1",
        time="2026-01-02T03:04:05.900000Z",
    )
    await harness.send(ana, bob)
    await harness.sync()
    assert cluster.gets("/api/v1/namespaces/default/configmaps/demo") == 1
    [entry] = await harness.log("%an|%aI|%s%n%b")
    head, *trailers = entry.splitlines()
    assert head == "bob@example.com|2026-01-02T03:04:05+00:00|[UPDATE] v1/configmaps/default/demo"
    assert "Co-authored-by: ana@example.com <ana@example.com>" in trailers
    assert [t for t in trailers if t.startswith("Audit-ID")] == [
        "Audit-ID: ana-1",
        "Audit-ID: bob-1",
    ]
    assert "User: bob@example.com" in trailers

    # Sent again (the webhook retries), neither makes another commit.
    await harness.send(ana, bob)
    await harness.sync()
    assert len(await harness.log("%H")) == 1


async def test_a_metadata_level_deletion_finished_by_a_controller_is_the_deleters(
    cluster: Cluster, harness: Harness
) -> None:
    held = configmap(finalizers=["example.com/cleanup"], rv="701")
    cluster.add("v1/configmaps", "default", "demo", held)
    await harness.send(event("create", level="Metadata", user="alice@example.com"))
    await harness.sync()
    controller = "system:serviceaccount:kube-system:cleanup-controller"
    # A controller's update of an object nobody is deleting is not even read.
    await harness.send(event("update", level="Metadata", user=controller))
    await harness.sync()
    assert cluster.gets("/api/v1/namespaces/default/configmaps/demo") == 1

    cluster.add(
        "v1/configmaps",
        "default",
        "demo",
        {**held, "metadata": {**held["metadata"], "deletionTimestamp": "2026-01-02T04:00:00Z"}},
    )
    await harness.send(event("delete", level="Metadata", user="bob@example.com"))
    await harness.sync()
    assert await harness.files() == ["live/v1/configmaps/default/demo.yaml"]  # still held

    del cluster.api.objects["v1/configmaps", "default", "demo"]  # the finalizer is gone
    await harness.send(event("update", level="Metadata", user=controller, audit_id="released"))
    await harness.sync()
    assert await harness.files() == []
    [entry] = (await harness.log("%an|%s%n%b"))[-1:]
    head, *trailers = entry.splitlines()
    assert head == "bob@example.com|[DELETE] v1/configmaps/default/demo"
    assert f"Deleted-By: {controller}" in trailers and "Audit-ID: released" in trailers


async def test_the_namespace_controllers_listless_deletecollection_is_the_deleters(
    cluster: Cluster, harness: Harness
) -> None:
    for name in ("a", "b"):
        await harness.send(
            event("create", namespace="shop", name=name, body=configmap(name, "shop"))
        )
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop", "deletionTimestamp": "2026-01-02T04:00:00Z"},
        "spec": {"finalizers": ["kubernetes"]},
    }
    await harness.send(
        event("delete", resource="namespaces", namespace="shop", name="shop", body=namespace),
    )
    sweep = event("deletecollection", namespace="shop", name=None, level="Metadata")
    sweep["user"] = {"username": "system:serviceaccount:kube-system:namespace-controller"}
    await harness.send(sweep)
    await harness.sync()
    assert await harness.files() == ["live/v1/namespaces/shop.yaml"]  # still terminating
    [entry] = (await harness.log("%an|%s%n%b"))[-1:]
    head, *trailers = entry.splitlines()
    assert head == "alice@example.com|[DELETE] v1/configmaps/shop"
    assert "Deleted-By: system:serviceaccount:kube-system:namespace-controller" in trailers


async def test_our_own_status_reports_rebuild_no_rules(cluster: Cluster) -> None:
    """A watched custom resource whose status alone changed (as our status reports change
    it) is no change of the rules; a change of its spec is."""
    _declare_crds(cluster.api)
    target = {"providerRef": {"name": "origin"}, "branch": "main", "path": "live"}
    cluster.add(f"{CB}/gittargets", "team", "live", _cr("GitTarget", "live", target))
    collection = Collection(cluster.client, "GitTarget", f"/apis/{CB}/gittargets")
    changes: list[int] = []
    task = asyncio.create_task(collection.run(lambda: changes.append(1)))
    path = f"/apis/{CB}/namespaces/team/gittargets/live"
    try:
        await collection.synced.wait()
        assert changes == [1]  # the first list
        ready = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
        assert await cluster.client.patch_status(path, ready)
        await eventually(lambda: "status" in collection.items["team", "live"])
        assert changes == [1]
        await Kubectl(cluster.client.server).apply(
            "gittargets", _cr("GitTarget", "live", {**target, "path": "moved"})
        )
        await eventually(lambda: collection.items["team", "live"]["spec"]["path"] == "moved")
        assert changes == [1, 1]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_serve_with_a_kubeconfig_reads_what_metadata_events_lack(
    tmp_path: Path, cluster: Cluster
) -> None:
    """The whole product: `serve --kubeconfig`, the webhook posting Metadata-level events."""
    cluster.add("v1/configmaps", "default", "demo", configmap(data={"from": "api"}))
    server = cluster.client.server
    kubeconfig = tmp_path / "kubeconfig"
    remote = tmp_path / "remote.git"
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(_kubeconfig(yarl.URL(server))))
    await asyncio.to_thread(bare_repo, remote)
    config = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote, max_commits=1)
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    served = await asyncio.to_thread(start_serve, tmp_path, *args, "--kubeconfig", str(kubeconfig))
    body = json.dumps(event_list(event("update", level="Metadata", body=None))).encode()
    status, _ = await asyncio.to_thread(
        request, served.port, "POST", "/audit-webhook", body, headers=JSON
    )
    assert status == 200
    log = await asyncio.to_thread(served.stop)
    assert f"read from {server}" in log
    content = await asyncio.to_thread(git_show, remote, "live/v1/configmaps/default/demo.yaml")
    assert "from: api" in content


# -- rules from the cluster's custom resources -------------------------------------------------

CB = "configbutler.ai/v1alpha1"


def _declare_crds(emulator: kmock.KubernetesEmulator) -> None:
    for plural, kind, namespaced in (
        ("gitproviders", "GitProvider", True),
        ("gittargets", "GitTarget", True),
        ("watchrules", "WatchRule", True),
        ("clusterwatchrules", "ClusterWatchRule", False),
    ):
        emulator.resources[f"{CB}/{plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, subresources={"status"}
        )
    emulator.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True)


def _cr(
    kind: str, name: str, spec: dict[str, Any], namespace: str | None = "team"
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": CB, "kind": kind, "metadata": metadata, "spec": spec}


def _one_target(cluster: Cluster, provider: dict[str, Any], path: str) -> None:
    """GitProvider origin, GitTarget live (folder ``path``), WatchRule cms for ConfigMaps,
    all in namespace default."""
    origin = _cr("GitProvider", "origin", provider, "default")
    cluster.add(f"{CB}/gitproviders", "default", "origin", origin)
    target = {"providerRef": {"name": "origin"}, "branch": "main", "path": path}
    cluster.add(f"{CB}/gittargets", "default", "live", _cr("GitTarget", "live", target, "default"))
    rule = {"targetRef": {"name": "live"}, "rules": [{"resources": ["configmaps"]}]}
    cluster.add(f"{CB}/watchrules", "default", "cms", _cr("WatchRule", "cms", rule, "default"))


class Kubectl:
    """Changes made through the API, as kubectl makes them: watchers see them."""

    def __init__(self, server: str) -> None:
        self.server = server

    async def apply(self, plural: str, body: dict[str, Any]) -> None:
        url = self._url(plural, body)
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
            if response.status == 409:  # exists: patch it
                headers = {"Content-Type": "application/merge-patch+json"}
                url = f"{url}/{body['metadata']['name']}"
                async with session.patch(url, json=body, headers=headers) as patched:
                    assert patched.status == 200, await patched.text()
            else:
                assert response.status in (200, 201), await response.text()

    async def delete(self, plural: str, body: dict[str, Any]) -> None:
        url = f"{self._url(plural, body)}/{body['metadata']['name']}"
        async with aiohttp.ClientSession() as session, session.delete(url) as response:
            assert response.status == 200, await response.text()

    def _url(self, plural: str, body: dict[str, Any]) -> str:
        namespace = body["metadata"].get("namespace")
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"{self.server}/apis/{body['apiVersion']}{scope}/{plural}"


async def test_rules_come_from_the_cluster_and_follow_its_changes(
    tmp_path: Path, cluster: Cluster
) -> None:
    _declare_crds(cluster.api)
    first = await asyncio.to_thread(bare_repo, tmp_path / "first.git")
    second = await asyncio.to_thread(bare_repo, tmp_path / "second.git")
    provider = {"url": f"file://{first}", "allowedBranches": ["main"], "push": {"maxCommits": 1}}
    cluster.add(f"{CB}/gitproviders", "team", "origin", _cr("GitProvider", "origin", provider))
    target = {"providerRef": {"name": "origin"}, "branch": "main", "path": "live"}
    cluster.add(f"{CB}/gittargets", "team", "live", _cr("GitTarget", "live", target))
    rule = {
        "targetRef": {"name": "live", "namespace": "team"},
        "rules": [{"scope": "Namespaced", "resources": ["configmaps"]}],
    }
    cluster.add(f"{CB}/clusterwatchrules", "", "all", _cr("ClusterWatchRule", "all", rule, None))

    rules = ClusterRules(cluster.client)
    config = await rules.start()
    runtime = await asyncio.to_thread(
        Runtime, config, Settings(state_dir=tmp_path / "state"), source=ApiObjects(cluster.client)
    )
    await runtime.start()
    rules.on_change = runtime.reconfigure
    kubectl = Kubectl(cluster.client.server)

    async def send(*items: dict[str, Any]) -> None:
        await runtime.intake.accept(runtime.intake.triage(list(items)))
        assert await runtime.flush() == []

    try:
        await send(event("create", name="a", body=configmap("a")))
        assert await asyncio.to_thread(git_files, first) == ["live/v1/configmaps/default/a.yaml"]

        # The target moves to another folder; a second repository gets its own target and rule.
        await kubectl.apply("gittargets", _cr("GitTarget", "live", {**target, "path": "moved"}))
        second_provider = {**provider, "url": f"file://{second}"}
        # (a WatchRule's target, and the target's provider, live in the rule's namespace)
        backup_provider = _cr("GitProvider", "backup", second_provider, "default")
        await kubectl.apply("gitproviders", backup_provider)
        backup = {"providerRef": {"name": "backup"}, "branch": "main", "path": "all"}
        await kubectl.apply("gittargets", _cr("GitTarget", "backup", backup, "default"))
        backup_rule = {"targetRef": {"name": "backup"}, "rules": [{"resources": ["configmaps"]}]}
        await kubectl.apply("watchrules", _cr("WatchRule", "backup", backup_rule, "default"))
        await eventually(
            lambda: len(runtime.config.targets) == 2 and len(runtime.config.watch_rules) == 1
        )

        await send(event("create", name="b", body=configmap("b")))
    finally:
        await runtime.close()
        await rules.close()
    assert await asyncio.to_thread(git_files, first) == [
        "live/v1/configmaps/default/a.yaml",
        "moved/v1/configmaps/default/b.yaml",
    ]
    assert await asyncio.to_thread(git_files, second) == ["all/v1/configmaps/default/b.yaml"]


async def test_a_broken_object_in_the_cluster_leaves_the_others_working(
    tmp_path: Path, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    _declare_crds(cluster.api)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    provider = {"url": f"file://{remote}", "allowedBranches": ["main"]}
    cluster.add(f"{CB}/gitproviders", "team", "origin", _cr("GitProvider", "origin", provider))
    good = {"providerRef": {"name": "origin"}, "branch": "main", "path": "live"}
    cluster.add(f"{CB}/gittargets", "team", "good", _cr("GitTarget", "good", good))
    cluster.add(
        f"{CB}/gittargets", "team", "bad", _cr("GitTarget", "bad", {**good, "branch": "dev"})
    )
    rules = ClusterRules(cluster.client)
    try:
        config = await rules.start()
    finally:
        await rules.close()
    assert list(config.targets) == [Key(namespace="team", name="good")]
    assert "GitTarget team/bad: spec.branch: 'dev' is not allowed" in caplog.text


class _FakeApi:
    """Behind our own small interface: a list, then a watch that has expired once."""

    def __init__(self) -> None:
        self.lists = 0
        self.server = "fake"

    async def get(self, path: str) -> dict[str, Any]:
        self.lists += 1
        items = [_cr("GitTarget", f"t{self.lists}", {})]
        return {"metadata": {"resourceVersion": str(self.lists)}, "items": items}

    async def watch(self, path: str, version: str) -> AsyncIterator[dict[str, Any]]:
        if self.lists == 1:
            raise WatchExpired(path)
        yield {"type": "ADDED", "object": _cr("GitTarget", "later", {})}
        await asyncio.Event().wait()  # then quiet


async def test_an_expired_watch_lists_again() -> None:
    api = _FakeApi()
    collection = Collection(api, "GitTarget", "/apis/x")  # type: ignore[arg-type]
    changes: list[int] = []
    task = asyncio.create_task(collection.run(lambda: changes.append(1)))
    try:
        await eventually(lambda: ("team", "later") in collection.items)
    finally:
        task.cancel()
    assert collection.relists == 1 and api.lists == 2
    assert set(collection.items) == {
        ("team", "t2"),
        ("team", "later"),
    }  # t1 is gone with the relist


async def test_serve_takes_its_rules_from_the_cluster_when_no_config_is_given(
    tmp_path: Path, cluster: Cluster
) -> None:
    _declare_crds(cluster.api)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    provider = {"url": f"file://{remote}", "allowedBranches": ["*"], "push": {"maxCommits": 1}}
    _one_target(cluster, provider, "cluster")
    server = cluster.client.server
    kubeconfig = tmp_path / "kubeconfig"
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(_kubeconfig(yarl.URL(server))))
    served = await asyncio.to_thread(
        start_serve, tmp_path, "--kubeconfig", str(kubeconfig), "--state-dir", str(tmp_path / "s")
    )
    cluster.add("v1/configmaps", "default", "demo", configmap(data={"from": "api"}))
    metadata_only = event("update", level="Metadata", body=None, user="jane@example.com")
    body = json.dumps(event_list(metadata_only)).encode()
    status, _ = await asyncio.to_thread(
        request, served.port, "POST", "/audit-webhook", body, headers=JSON
    )
    assert status == 200

    def reported() -> bool:  # the snapshot and the status report run beside the events
        shown = cluster.api.objects[f"{CB}/gittargets", "default", "live"].get("status") or {}
        return "snapshot" in shown and bool(shown.get("conditions"))

    await eventually(reported)
    log = await asyncio.to_thread(served.stop)
    assert "rules from the cluster: 1 GitTargets, 1 WatchRules" in log
    assert await asyncio.to_thread(git_files, remote) == ["cluster/v1/configmaps/default/demo.yaml"]
    content = await asyncio.to_thread(git_show, remote, "cluster/v1/configmaps/default/demo.yaml")
    assert "from: api" in content and "resourceVersion" not in content  # full, sanitized
    authors = await asyncio.to_thread(git, remote, "log", "--format=%an", "main")
    assert authors.split() == ["jane@example.com"]
    # A new target is snapshotted once (its status says when) and shows Ready.
    status = cluster.api.objects[f"{CB}/gittargets", "default", "live"]["status"]
    assert status["snapshot"]["lastCompletedTime"]
    assert [c["reason"] for c in status["conditions"]] == ["Ready"]


async def test_the_custom_resources_show_why_they_are_ready_or_not(
    tmp_path: Path, cluster: Cluster
) -> None:
    _declare_crds(cluster.api)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    provider = {"url": f"file://{remote}", "allowedBranches": ["main"]}
    cluster.add(f"{CB}/gitproviders", "team", "origin", _cr("GitProvider", "origin", provider))
    good = {"providerRef": {"name": "origin"}, "branch": "main", "path": "live"}
    live = _cr("GitTarget", "live", good)
    live["metadata"]["generation"] = 3
    cluster.add(f"{CB}/gittargets", "team", "live", live)
    cluster.add(
        f"{CB}/gittargets", "team", "dev", _cr("GitTarget", "dev", {**good, "branch": "dev"})
    )
    locked = {**good, "path": "vault", "encryption": {"provider": "sops", "age": {"enabled": True}}}
    cluster.add(f"{CB}/gittargets", "team", "vault", _cr("GitTarget", "vault", locked))
    orphan = {"targetRef": {"name": "gone"}, "rules": [{"resources": ["configmaps"]}]}
    cluster.add(f"{CB}/watchrules", "team", "orphan", _cr("WatchRule", "orphan", orphan))
    fine = {"targetRef": {"name": "live"}, "rules": [{"resources": ["configmaps"]}]}
    cluster.add(f"{CB}/watchrules", "team", "fine", _cr("WatchRule", "fine", fine))

    rules = ClusterRules(cluster.client)
    config = await rules.start()
    runtime = await asyncio.to_thread(Runtime, config, Settings(state_dir=tmp_path / "state"))
    await runtime.start()
    reporter = StatusReporter(cluster.client, rules, runtime.status_state)
    try:
        await runtime.intake.accept(
            runtime.intake.triage(
                [event("create", namespace="team", body=configmap(namespace="team"))]
            )
        )
        assert await runtime.flush() == []
        assert await reporter.report() == 6
        assert await reporter.report() == 0  # nothing changed: nothing written
    finally:
        await runtime.close()
        await rules.close()

    def ready(plural: str, name: str) -> tuple[str, str]:
        status = cluster.api.objects[f"{CB}/{plural}", "team", name]["status"]
        [condition] = status["conditions"]
        assert condition["type"] == "Ready" and condition["lastTransitionTime"]
        return condition["status"], condition["reason"]

    assert ready("gitproviders", "origin") == ("True", "Ready")
    assert ready("gittargets", "live") == ("True", "Ready")
    assert ready("gittargets", "dev") == ("False", "BranchNotAllowed")
    assert ready("gittargets", "vault") == ("False", "EncryptionNotReady")
    assert ready("watchrules", "orphan") == ("False", "TargetNotFound")
    assert ready("watchrules", "fine") == ("True", "Ready")
    status = cluster.api.objects[f"{CB}/gittargets", "team", "live"]["status"]
    assert status["observedGeneration"] == 3
    pushed = (await asyncio.to_thread(git, remote, "rev-parse", "main")).strip()
    assert status["lastCommit"] == pushed and status["lastPushTime"]
    patches = [r for r in cluster.api if str(r.method).endswith("PATCH")]
    assert len(patches) == 6 and all(r.url.path.endswith("/status") for r in patches)


# -- snapshot and prune ---------------------------------------------------------------------------


def _seed_remote(remote: Path, work: Path, files: dict[str, str]) -> None:
    """What the repository held before: files written by an earlier run or by hand."""
    subprocess.run(["git", "clone", "-q", str(remote), str(work)], check=True)
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    run = ["git", "-C", str(work), "-c", "user.name=Bob", "-c", "user.email=bob@example.com"]
    subprocess.run([*run, "add", "-A"], check=True)
    subprocess.run([*run, "commit", "-q", "-m", "before"], check=True)
    subprocess.run([*run, "push", "-q", "origin", "HEAD:main"], check=True)


async def test_a_snapshot_writes_what_the_rules_select_and_prunes_what_is_gone(
    tmp_path: Path, cluster: Cluster
) -> None:
    # kmock lists only resources that declare the list verb (a fixture fills that gap).
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch"}
    )
    cluster.add("v1/configmaps", "default", "a", configmap("a"))
    cluster.add("v1/configmaps", "shop", "b", configmap("b", namespace="shop"))
    owned = configmap("owned", ownerReferences=[{"kind": "Thing", "name": "t", "controller": True}])
    cluster.add("v1/configmaps", "default", "owned", owned)  # generated: not in the snapshot
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    before = {
        "live/v1/configmaps/default/stale.yaml": "gone from the cluster\n",
        "live/apps/v1/deployments/default/web.yaml": "a type this run did not list\n",
        "docs/README.md": "not ours\n",
    }
    await asyncio.to_thread(_seed_remote, remote, tmp_path / "bob", before)
    harness = await start_harness(tmp_path, source=ApiObjects(cluster.client))
    runtime = harness.runtime
    [target] = runtime.config.targets.values()
    try:
        for _ in range(2):  # the second one finds nothing to do
            result = await snapshot(
                api=cluster.client,
                objects=ApiObjects(cluster.client),
                config=runtime.config,
                target=target,
                processor=runtime.processor,
                writer=runtime.sinks[target.key],
                committer=runtime.settings.committer,
            )
        await harness.sync()
    finally:
        await runtime.close()
    assert (result.files, result.written, result.pruned) == (2, False, False)
    assert await harness.log("%an %s") == [
        "Bob before",
        "audit-reverser [SNAPSHOT] live",
        "audit-reverser [PRUNE] live",
    ]
    assert await harness.files() == [
        "docs/README.md",
        "live/apps/v1/deployments/default/web.yaml",
        "live/v1/configmaps/default/a.yaml",
        "live/v1/configmaps/shop/b.yaml",
    ]
    assert "name: b" in await harness.show("live/v1/configmaps/shop/b.yaml")


async def test_the_snapshot_command_commits_and_pushes(tmp_path: Path, cluster: Cluster) -> None:
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list"}
    )
    cluster.add("v1/configmaps", "default", "a", configmap("a"))
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    config = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote)
    kubeconfig = tmp_path / "kubeconfig"
    server = cluster.client.server
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(_kubeconfig(yarl.URL(server))))
    command = [sys.executable, "-m", "audit_reverser", "snapshot", "--kubeconfig", str(kubeconfig)]
    command += ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "GitTarget team/live: 1 objects, snapshot committed, nothing to prune"
    )
    assert await asyncio.to_thread(git_files, remote) == ["live/v1/configmaps/default/a.yaml"]
    unknown = [*command, "--target", "team/nope"]
    done = await asyncio.to_thread(subprocess.run, unknown, capture_output=True, text=True)
    assert done.returncode == 2 and "--target team/nope: no such GitTarget" in done.stderr


async def test_a_deletecollection_without_its_list_removes_what_the_api_no_longer_has(
    cluster: Cluster, harness: Harness
) -> None:
    for name in ("a", "b", "c"):
        await harness.send(event("create", name=name, body=configmap(name)))
    cluster.add("v1/configmaps", "default", "c", configmap("c"))  # a and b are gone
    await harness.send(
        event("deletecollection", name=None, level="Metadata", body=None, user="bob")
    )
    await harness.sync()
    assert await harness.files() == ["live/v1/configmaps/default/c.yaml"]
    assert (await harness.log("%an %s"))[-1] == "bob [DELETE] v1/configmaps/default"


async def test_generate_when_missing_writes_one_key_into_the_cluster_secret(
    tmp_path: Path, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed's quickstart GitTarget as written: the key lands in Secret sops-age-key."""
    _declare_crds(cluster.api)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    quickstart = await asyncio.to_thread(
        lambda: yaml.safe_load((SEED / "quickstart-gittarget.yaml").read_text())
    )
    provider = {"url": f"file://{remote}", "allowedBranches": ["*"], "push": {"maxCommits": 1}}
    cluster.add(
        f"{CB}/gitproviders",
        "default",
        "example-provider",
        _cr("GitProvider", "example-provider", provider, "default"),
    )
    cluster.add(f"{CB}/gittargets", "default", "example-target", quickstart)
    rule = {"targetRef": {"name": "example-target"}, "rules": [{"resources": ["secrets"]}]}
    cluster.add(
        f"{CB}/watchrules", "default", "secrets", _cr("WatchRule", "secrets", rule, "default")
    )

    for _ in range(2):  # a restart finds the key and makes no other
        rules = ClusterRules(cluster.client)
        config = await rules.start()
        await rules.close()
    key_secret = cluster.api.objects["v1/secrets", "default", "sops-age-key"]
    [entry] = key_secret["data"]
    assert entry.endswith(".agekey")
    annotations = key_secret["metadata"]["annotations"]
    assert annotations["configbutler.ai/backup-warning"] == "REMOVE_AFTER_BACKUP"
    identity = age.Identity.parse(base64.b64decode(key_secret["data"][entry]).decode())
    assert annotations["configbutler.ai/age-recipient"] == identity.recipient
    assert caplog.text.count("generated the age key") == 1
    assert "BACK UP the age key in Secret default/sops-age-key" in caplog.text

    settings = Settings(state_dir=tmp_path / "state", rules_from_files=False)
    runtime = await asyncio.to_thread(Runtime, config, settings)
    await runtime.start()
    try:
        body = {**configmap("db"), "kind": "Secret", "data": {"password": "aHVudGVyMg=="}}
        body.pop("metadata")
        body["metadata"] = {"name": "db", "namespace": "default", "resourceVersion": "3"}
        await runtime.intake.accept(
            runtime.intake.triage([event("create", resource="secrets", name="db", body=body)])
        )
        assert await runtime.flush() == []
    finally:
        await runtime.close()
    stored = await asyncio.to_thread(
        git_show, remote, "live-cluster/v1/secrets/default/db.sops.yaml"
    )
    assert sops.decrypt(sops.load(stored), [identity])["data"] == {"password": "aHVudGVyMg=="}
    assert not await asyncio.to_thread((tmp_path / "state" / "encryption" / "keys").exists)


async def test_the_seed_samples_show_why_they_are_not_ready(
    tmp_path: Path, cluster: Cluster
) -> None:
    """The seed's samples applied as they are: the provider's Secret git-creds is missing."""
    _declare_crds(cluster.api)
    samples = await asyncio.to_thread(
        lambda: [
            yaml.safe_load((SEED / f"quickstart-{kind}.yaml").read_text())
            for kind in ("gitprovider", "gittarget", "watchrule")
        ]
    )
    for sample in samples:
        plural = {"GitProvider": "gitproviders", "GitTarget": "gittargets"}.get(
            sample["kind"], "watchrules"
        )
        cluster.add(f"{CB}/{plural}", "default", sample["metadata"]["name"], sample)
    rules = ClusterRules(cluster.client)
    config = await rules.start()
    settings = Settings(state_dir=tmp_path / "state", rules_from_files=False)
    runtime = await asyncio.to_thread(Runtime, config, settings)
    await runtime.start()
    try:
        reporter = StatusReporter(cluster.client, rules, runtime.status_state)
        assert await reporter.report() == 3
    finally:
        await runtime.close()
        await rules.close()

    def condition(plural: str, name: str) -> dict[str, str]:
        [found] = cluster.api.objects[f"{CB}/{plural}", "default", name]["status"]["conditions"]
        return found

    provider = condition("gitproviders", "example-provider")
    assert (provider["status"], provider["reason"]) == ("False", "CredentialsInvalid")
    assert "Secret default/git-creds not found" in provider["message"]
    target = condition("gittargets", "example-target")
    assert (target["status"], target["reason"]) == ("False", "ProviderNotReady")
    assert condition("watchrules", "example-watchrule")["status"] == "True"


async def test_events_for_a_target_whose_provider_cannot_be_used_are_counted_not_crashed(
    tmp_path: Path, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    _declare_crds(cluster.api)
    provider = {
        "url": "git@github.com:o/r.git",
        "allowedBranches": ["*"],
        "secretRef": {"name": "none"},
    }
    _one_target(cluster, provider, "live")
    rules = ClusterRules(cluster.client)
    config = await rules.start()
    await rules.close()
    settings = Settings(state_dir=tmp_path / "state", rules_from_files=False)
    runtime = await asyncio.to_thread(Runtime, config, settings)
    await runtime.start()
    try:
        await runtime.intake.accept(runtime.intake.triage([event("create", body=configmap())]))
        assert await runtime.flush() == []
    finally:
        await runtime.close()
    assert runtime.stats.skipped[Skip.TARGET_NOT_READY] == 1
    assert "Traceback" not in caplog.text
    assert "GitTarget default/live left out: GitProvider default/origin" in caplog.text


# -- a Flux GitRepository as the provider (file mode: test_flux.py) --------------------------


def _declare_flux(cluster: Cluster) -> None:
    cluster.api.resources[f"{FLUX}/gitrepositories"] = kmock.ResourceInfo(
        kind="GitRepository", namespaced=True, subresources={"status"}
    )


def _condition(cluster: Cluster, name: str) -> tuple[str, str, str]:
    [ready] = cluster.api.objects[f"{CB}/gittargets", "team", name]["status"]["conditions"]
    return ready["status"], ready["reason"], ready["message"]


async def test_a_flux_git_repository_in_the_cluster_is_watched_like_our_own_kinds(
    tmp_path: Path, cluster: Cluster
) -> None:
    _declare_crds(cluster.api)
    _declare_flux(cluster)
    first = await asyncio.to_thread(bare_repo, tmp_path / "first.git")
    second = await asyncio.to_thread(bare_repo, tmp_path / "second.git")
    cluster.add(f"{FLUX}/gitrepositories", "team", "origin", git_repository(f"file://{first}"))
    cluster.add(f"{CB}/gittargets", "team", "live", target("live", FLUX_REF))
    cluster.add(f"{CB}/clusterwatchrules", "", "to-live", every_configmap("live"))
    # SSH without a deploy key: its target says so (a GitRepository gets no status of ours).
    keyless = git_repository("ssh://git@127.0.0.1:1/r.git", name="keyless")
    cluster.add(f"{FLUX}/gitrepositories", "team", "keyless", keyless)
    cluster.add(f"{CB}/gittargets", "team", "k", target("k", {**FLUX_REF, "name": "keyless"}))
    # Workload identity is not supported: its target says so.
    cloud = git_repository("https://github.com/o/r.git", name="cloud")
    cloud["spec"]["provider"] = "github"
    cluster.add(f"{FLUX}/gitrepositories", "team", "cloud", cloud)
    cluster.add(f"{CB}/gittargets", "team", "c", target("c", {**FLUX_REF, "name": "cloud"}))

    rules = ClusterRules(cluster.client)
    config = await rules.start()
    settings = Settings(state_dir=tmp_path / "state", rules_from_files=False)
    runtime = await asyncio.to_thread(Runtime, config, settings)
    await runtime.start()
    rules.on_change = runtime.reconfigure
    reporter = StatusReporter(cluster.client, rules, runtime.status_state)
    kubectl = Kubectl(cluster.client.server)

    async def send(name: str) -> None:
        items = [event("create", name=name, body=configmap(name))]
        await runtime.intake.accept(runtime.intake.triage(items))
        assert await runtime.flush() == []

    try:
        await send("a")
        await reporter.report()
        assert _condition(cluster, "live")[:2] == ("True", "Ready")
        status, reason, message = _condition(cluster, "k")
        assert (status, reason) == ("False", "ProviderNotReady")
        assert message.startswith("GitRepository team/keyless: remote ssh://git@127.0.0.1:1/r")
        assert "SSH needs a deploy key" in message
        assert _condition(cluster, "c") == (
            "False",
            "ProviderNotFound",
            "GitTarget team/c: spec.providerRef.name: GitRepository team/cloud not found: it "
            "cannot be used: GitRepository team/cloud (GitRepository cloud): spec.provider: "
            "'github' (workload identity) is not supported: give the GitRepository a "
            "spec.secretRef with the credentials",
        )
        # A new URL takes effect without restart.
        await kubectl.apply("gitrepositories", git_repository(f"file://{second}"))
        await eventually(lambda: runtime.config.providers[FLUX_KEY].url == f"file://{second}")
        await send("b")
        # Gone: the target is not ready, and says which GitRepository it misses.
        await kubectl.delete("gitrepositories", git_repository(""))
        await eventually(lambda: list(runtime.config.targets) == [Key(namespace="team", name="k")])
        await reporter.report()
    finally:
        await runtime.close()
        await rules.close()
    assert await asyncio.to_thread(git_files, first) == ["live/v1/configmaps/default/a.yaml"]
    assert await asyncio.to_thread(git_files, second) == ["live/v1/configmaps/default/b.yaml"]
    assert _condition(cluster, "live") == (
        "False",
        "ProviderNotFound",
        "GitTarget team/live: spec.providerRef.name: GitRepository team/origin not found",
    )
    # Flux's object is read, never written (by us: the test's own requests carry no token).
    ours = [r for r in cluster.api if r.headers.get("Authorization") == f"Bearer {TOKEN}"]
    assert any(r.url.path.endswith("/gitrepositories") for r in ours)
    assert all(r.method.value == "GET" for r in ours if "gitrepositories" in r.url.path)


async def test_without_flux_the_rest_works_and_flux_targets_say_why(
    tmp_path: Path, cluster: Cluster
) -> None:
    _declare_crds(cluster.api)  # and no GitRepository resource: Flux is not installed
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    own = {"url": f"file://{remote}", "allowedBranches": ["main"]}
    cluster.add(f"{CB}/gitproviders", "team", "origin", _cr("GitProvider", "origin", own))
    cluster.add(f"{CB}/gittargets", "team", "own", target("own", {"name": "origin"}))
    cluster.add(f"{CB}/gittargets", "team", "viaflux", target("viaflux", FLUX_REF))
    rules = ClusterRules(cluster.client)
    config = await rules.start()
    runtime = await asyncio.to_thread(Runtime, config, Settings(state_dir=tmp_path / "state"))
    await runtime.start()
    try:
        assert await StatusReporter(cluster.client, rules, runtime.status_state).report() == 3
    finally:
        await runtime.close()
        await rules.close()
    assert list(config.targets) == [Key(namespace="team", name="own")]
    assert _condition(cluster, "own")[:2] == ("True", "Ready")
    status, reason, message = _condition(cluster, "viaflux")
    assert (status, reason) == ("False", "ProviderNotFound")
    assert message == (
        "GitTarget team/viaflux: spec.providerRef.name: GitRepository team/origin not found "
        "(the API serves no /apis/source.toolkit.fluxcd.io/v1/gitrepositories (is Flux "
        "installed?))"
    )


async def test_flux_installed_after_the_start_is_found(
    tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules_module, "ABSENT_RETRY_S", 0.05)
    _declare_crds(cluster.api)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    cluster.add(f"{CB}/gittargets", "team", "live", target("live", FLUX_REF))
    rules = ClusterRules(cluster.client)
    config = await rules.start()
    runtime = await asyncio.to_thread(Runtime, config, Settings(state_dir=tmp_path / "state"))
    await runtime.start()
    rules.on_change = runtime.reconfigure
    try:
        assert not config.targets
        _declare_flux(cluster)  # Flux is installed, then the GitRepository applied
        cluster.add(f"{FLUX}/gitrepositories", "team", "origin", git_repository(f"file://{remote}"))
        await eventually(lambda: bool(runtime.config.targets))
    finally:
        await runtime.close()
        await rules.close()
    assert rules.flux.unavailable is None
