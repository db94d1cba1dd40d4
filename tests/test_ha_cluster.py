"""What one replica at a time may do, with rules from a cluster and ``serve --journal``: a
standby (another replica holds the writer lease) answers the webhook but patches no status,
snapshots no new GitTarget, resyncs nothing and generates no key; once it holds the lease
it does all of these. The API is kmock (its request log is what is checked), Redis a real
``redis-server``, the remote a real bare repository.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import kmock
import yaml
import yarl

from tests.conftest import bare_repo, configmap, event, event_list, git, request, start_serve
from tests.redisserver import RedisServer
from tests.test_cluster import CB, JSON, SEED, Cluster, _cr, _declare_crds, _kubeconfig, cluster
from tests.test_ha_serve import STREAM

__all__ = ["cluster"]  # the fixture, used by name

LEASE_KEY = "audit-reverser:lease:intake"


def _writes(cluster: Cluster) -> list[str]:
    """Every request that changed something in the API: method and path."""
    return [
        f"{r.method.value} {r.url.path}"
        for r in cluster.api
        if r.method.value in ("POST", "PUT", "PATCH", "DELETE")
    ]


def _key_made(cluster: Cluster) -> bool:
    return any(key[1:] == ("default", "sops-age-key") for key in cluster.api.objects)


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
        while not predicate():  # noqa: ASYNC110 - the state lives in kmock and serve
            await asyncio.sleep(0.05)


async def test_a_standby_does_none_of_the_single_jobs_until_it_holds_the_lease(
    tmp_path: Path, cluster: Cluster, redis_server: RedisServer
) -> None:
    _declare_crds(cluster.api)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    provider = {"url": f"file://{remote}", "allowedBranches": ["*"], "push": {"maxCommits": 1}}
    cluster.add(
        f"{CB}/gitproviders",
        "default",
        "example-provider",
        _cr("GitProvider", "example-provider", provider, "default"),
    )
    quickstart = await asyncio.to_thread(
        lambda: yaml.safe_load((SEED / "quickstart-gittarget.yaml").read_text())
    )
    cluster.add(f"{CB}/gittargets", "default", "example-target", quickstart)
    rule = {"targetRef": {"name": "example-target"}, "rules": [{"resources": ["configmaps"]}]}
    cluster.add(f"{CB}/watchrules", "default", "cms", _cr("WatchRule", "cms", rule, "default"))
    # kmock lists only resources that declare the list verb (as in tests/test_cluster.py).
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch"}
    )
    cluster.add("v1/configmaps", "default", "demo", configmap("demo"))
    kubeconfig = tmp_path / "kubeconfig"
    server = yarl.URL(cluster.client.server)
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(_kubeconfig(server)))
    # Another replica writes: its lease, which it renews (the test sets it again below).
    await asyncio.to_thread(redis_server.command, "SET", LEASE_KEY, "1:another-replica")

    served = await asyncio.to_thread(
        start_serve,
        tmp_path,
        "--kubeconfig",
        str(kubeconfig),
        "--state-dir",
        str(tmp_path / "s"),
        "--journal",
        redis_server.url,
        "--journal-password-file",
        str(redis_server.password_file),
        "--journal-lease",
        "1",
        "--resync-interval",
        "1",
    )
    try:
        body = json.dumps(event_list(event("create", name="new", body=configmap("new")))).encode()
        status, _ = await asyncio.to_thread(
            request, served.port, "POST", "/audit-webhook", body, headers=JSON
        )
        assert status == 200  # the standby stored it for the writer
        assert await asyncio.to_thread(redis_server.command, "XLEN", STREAM) == "1"
        # Several of the standby's tries for the lease, status reports and resyncs would
        # have come and gone by now, had it not been a standby.
        await asyncio.sleep(3)
        assert _writes(cluster) == []
        assert not _key_made(cluster)
        assert await asyncio.to_thread(git, remote, "rev-list", "--all") == ""

        await asyncio.to_thread(redis_server.command, "DEL", LEASE_KEY)  # the writer is gone

        def done() -> bool:
            target = cluster.api.objects[f"{CB}/gittargets", "default", "example-target"]
            shown = target.get("status") or {}
            return _key_made(cluster) and "snapshot" in shown and bool(shown.get("conditions"))

        await _until(done)  # the new writer's key, status and snapshot
    finally:
        log = await asyncio.to_thread(served.stop)
    writes = _writes(cluster)
    assert any(w.startswith("PATCH /apis/configbutler.ai") for w in writes), writes
    assert "POST /api/v1/namespaces/default/secrets" in writes  # the generated key
    assert "generated the age key" in log
    files = (await asyncio.to_thread(git, remote, "ls-tree", "-r", "--name-only", "main")).split()
    assert "live-cluster/v1/configmaps/default/new.yaml" in files  # the event the standby took
    assert "live-cluster/v1/configmaps/default/demo.yaml" in files  # the snapshot
