"""Cluster mode: objects the audit events do not carry are read from the API.

The API is kmock's Kubernetes emulator, served over real HTTP to kubernetes-asyncio. kmock
gaps are filled here, in the fixtures (resourceVersions, declared resources), never in the
product.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
import yarl

from audit_reverser.cluster.api import KubeApi
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.pipeline.filter import Skip
from tests.conftest import (
    Harness,
    bare_repo,
    configmap,
    event,
    event_list,
    git_show,
    request,
    start_harness,
    start_serve,
    write_config,
)

JSON = {"Content-Type": "application/json"}


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
        "users": [{"name": "audit-reverser", "user": {"token": "test-token"}}],
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
    assert len(await harness.subjects()) == 1  # the later events see the same state


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
