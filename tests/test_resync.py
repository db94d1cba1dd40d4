"""Periodic resync in cluster mode: Git converges to the cluster even without events.

The cluster is kmock's Kubernetes emulator over real HTTP (see test_cluster.py); what the
resync did is read back from the bare remote with plain git.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
import yarl

from audit_reverser.cluster.api import KubeApi
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.resync import Resyncer, ResyncResult, ResyncStats
from audit_reverser.config import load_config
from audit_reverser.config.model import GitTarget, Key
from audit_reverser.pipeline.filter import Skip
from audit_reverser.runtime import Runtime, Settings
from tests.conftest import (
    Harness,
    bare_repo,
    configmap,
    event,
    git,
    git_files,
    git_show,
    request,
    start_harness,
    start_serve,
    write_config,
)
from tests.test_cluster import Cluster, _kubeconfig, _seed_remote, cluster
from tests.test_metrics import CLUSTER_MODE_ONLY

__all__ = ["cluster"]  # the fixture, shared with test_cluster

COMMITTER = "audit-reverser <audit-reverser@audit-reverser.invalid>"
A = "live/v1/configmaps/default/a.yaml"
B = "live/v1/configmaps/default/b.yaml"
C = "live/v1/configmaps/default/c.yaml"
D = "live/v1/configmaps/default/d.yaml"


@pytest.fixture
async def harness(tmp_path: Path, cluster: Cluster) -> AsyncIterator[Harness]:
    # kmock lists only resources that declare the list verb (a fixture fills that gap).
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch"}
    )
    started = await start_harness(tmp_path, source=ApiObjects(cluster.client))
    yield started
    await started.runtime.close()


async def _resync(harness: Harness, api: KubeApi) -> ResyncResult:
    [target] = harness.runtime.config.targets.values()
    [result] = (await harness.runtime.resync([target], api, ApiObjects(api))).values()
    assert isinstance(result, ResyncResult)
    await harness.sync()
    return result


async def _commits(harness: Harness) -> list[str]:
    return await harness.log("%an <%ae> | %cn <%ce> | %s")


async def test_changes_made_while_no_events_came_become_one_resync_commit(
    cluster: Cluster, harness: Harness
) -> None:
    await harness.send(event("create", name="a", body=configmap("a")))
    await harness.send(event("create", name="b", body=configmap("b")))
    await harness.sync()
    # Meanwhile, without events reaching us: a changed, b was deleted, c was made.
    cluster.add("v1/configmaps", "default", "a", configmap("a", data={"v": "2"}, rv="200"))
    cluster.add("v1/configmaps", "default", "c", configmap("c", rv="201"))
    owned = configmap("owned", ownerReferences=[{"kind": "Thing", "name": "t", "controller": True}])
    cluster.add("v1/configmaps", "default", "owned", owned)  # generated: never in Git

    result = await _resync(harness, cluster.client)

    tip = (await asyncio.to_thread(git, harness.remote, "rev-parse", "main")).strip()
    assert result == ResyncResult(
        objects=2, files_set=2, files_removed=1, files_left=0, commit_id=tip
    )
    commits = await _commits(harness)
    assert commits[2:] == [f"{COMMITTER} | {COMMITTER} | [RESYNC] live"]
    assert await harness.files() == [A, C]
    assert "v: '2'" in await harness.show(A) and "resourceVersion" not in await harness.show(A)
    body = await asyncio.to_thread(git, harness.remote, "log", "-1", "--format=%b", "main")
    assert body.split("\n")[:2] == ["Objects: 2", "Target: team/live"]

    again = await _resync(harness, cluster.client)  # nothing differs: no commit
    assert (again.commit_id, again.files_set, again.files_removed) == (None, 0, 0)
    assert await _commits(harness) == commits


async def test_a_file_an_event_wrote_at_a_newer_version_is_not_regressed(
    cluster: Cluster, harness: Harness
) -> None:
    cluster.add("v1/configmaps", "default", "a", configmap("a", data={"v": "old"}, rv="200"))
    await harness.send(event("update", name="a", body=configmap("a", data={"v": "new"}, rv="300")))
    await harness.sync()

    result = await _resync(harness, cluster.client)

    assert (result.files_left, result.commit_id) == (1, None)
    assert "v: new" in await harness.show(A)


async def test_an_event_older_than_what_a_resync_wrote_does_not_bring_it_back(
    cluster: Cluster, harness: Harness
) -> None:
    cluster.add("v1/configmaps", "default", "a", configmap("a", data={"v": "now"}, rv="200"))
    await _resync(harness, cluster.client)
    # The apiserver's late batch: a change from before the state the resync wrote.
    await harness.send(event("update", name="a", body=configmap("a", data={"v": "old"}, rv="150")))
    await harness.sync()
    assert "v: now" in await harness.show(A)
    assert harness.runtime.stats.skipped[Skip.STALE] == 1


class _ChangesWhileListing(KubeApi):
    """The cluster's API, with changes arriving (as events) while configmaps are listed."""

    during: Callable[[], Awaitable[None]] | None = None

    async def get(
        self, path: str, query: list[tuple[str, str]] | None = None
    ) -> dict[str, Any] | None:
        page = await super().get(path, query)
        if path == "/api/v1/configmaps" and self.during is not None:
            during, self.during = self.during, None
            await during()
        return page


async def test_changes_made_while_a_resync_lists_are_left_to_their_events(
    cluster: Cluster, harness: Harness
) -> None:
    await harness.send(event("create", name="b", body=configmap("b")))
    await harness.sync()
    for name, rv in (("a", "200"), ("b", "100"), ("e", "202")):  # e: no event ever came
        cluster.add("v1/configmaps", "default", name, configmap(name, data={"v": "listed"}, rv=rv))
    api = await _ChangesWhileListing.from_dict(_kubeconfig(yarl.URL(cluster.client.server)))

    async def events() -> None:  # after the list was answered, before the resync commits
        newer = configmap("a", data={"v": "event"}, rv="250")
        await harness.send(event("update", name="a", body=newer))
        await harness.send(event("create", name="d", body=configmap("d", rv="251")))
        gone = {"kind": "Status", "apiVersion": "v1", "status": "Success"}  # no version
        await harness.send(event("delete", name="b", body=gone))
        await harness.runtime.intake.drain()

    api.during = events
    try:
        result = await _resync(harness, api)
    finally:
        await api.close()

    assert (result.files_set, result.files_removed, result.files_left) == (1, 0, 2)
    assert await harness.files() == [A, D, "live/v1/configmaps/default/e.yaml"]
    assert "v: event" in await harness.show(A)
    assert (await harness.log("%s"))[-1] == "[RESYNC] live"  # e: the one thing it wrote


async def test_a_run_the_api_cannot_answer_is_tried_again(
    cluster: Cluster, harness: Harness
) -> None:
    cluster.add("v1/configmaps", "default", "a", configmap("a", rv="200"))
    cluster.api["get /api/v1/configmaps"][:5] << 503  # every try of the first run
    stats = ResyncStats()
    runtime = harness.runtime
    objects = ApiObjects(cluster.client)

    async def run(targets: list[GitTarget]) -> dict[Key, ResyncResult | Exception]:
        return await runtime.resync(targets, cluster.client, objects)

    resyncer = Resyncer(
        interval_s=3600,
        targets=lambda: runtime.config.targets.values(),
        run=run,
        stats=stats,
        retry_min_s=0.01,
    )
    resyncer.start()
    try:
        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while not stats.runs_ok:  # noqa: ASYNC110 - the resync runs in its own task
                await asyncio.sleep(0.02)
    finally:
        await resyncer.close()
    await harness.sync()
    assert (stats.runs_failed, stats.runs_ok) == (1, 1)
    assert stats.last_ok_at is not None
    assert dict(stats.commits) == {"team/live": 1} and dict(stats.files_set) == {"team/live": 1}
    assert await harness.files() == [A]


async def test_serve_resyncs_at_start_and_counts_it_in_metrics(
    tmp_path: Path, cluster: Cluster
) -> None:
    """The whole product: what changed while serve was away is committed when it starts."""
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list"}
    )
    cluster.add("v1/configmaps", "default", "a", configmap("a", rv="200"))
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    before = {B: "its object was deleted while we were away\n", "docs/README.md": "not ours\n"}
    await asyncio.to_thread(_seed_remote, remote, tmp_path / "bob", before)
    config = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote, max_commits=1)
    kubeconfig = tmp_path / "kubeconfig"
    server = cluster.client.server
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(_kubeconfig(yarl.URL(server))))
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    served = await asyncio.to_thread(start_serve, tmp_path, *args, "--kubeconfig", str(kubeconfig))

    async def metrics() -> str:
        status, body = await asyncio.to_thread(request, served.port, "GET", "/metrics")
        assert status == 200
        return body.decode()

    async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
        ran = 'audit_reverser_resync_runs_total{result="ok"} 1.0'
        while ran not in (shown := await metrics()):  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)
    log = await asyncio.to_thread(served.stop)

    for line in (
        'audit_reverser_resync_runs_total{result="failed"} 0.0',
        'audit_reverser_resync_commits_total{target="team/live"} 1.0',
        'audit_reverser_resync_files_updated_total{target="team/live"} 1.0',
        'audit_reverser_resync_files_removed_total{target="team/live"} 1.0',
        'audit_reverser_resync_files_left_total{target="team/live"} 0.0',
        "audit_reverser_last_resync_timestamp_seconds ",
    ):
        assert line in shown
    for name in CLUSTER_MODE_ONLY:  # what the dashboard and alerts may name
        assert f"\n{name}" in shown, name
    assert "resync: 1 GitTargets (0 failed), 1 objects, 1 files updated, 1 removed" in log
    assert await asyncio.to_thread(git_files, remote) == ["docs/README.md", A]
    assert "name: a" in await asyncio.to_thread(git_show, remote, A)
    who = await asyncio.to_thread(git, remote, "log", "-1", "--format=%an <%ae> | %cn <%ce> | %s")
    assert who.strip() == f"{COMMITTER} | {COMMITTER} | [RESYNC] live"


ONE_NAMESPACE = """\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: default}}
spec: {{url: "file://{remote}", allowedBranches: ["main"]}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: live, namespace: default}}
spec: {{providerRef: {{name: origin}}, branch: main, path: live}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: cms, namespace: default}}
spec:
  targetRef: {{name: live}}
  rules: [{{resources: ["configmaps"]}}]
"""


async def test_only_the_namespaces_a_watchrule_selects_are_compared(
    tmp_path: Path, cluster: Cluster
) -> None:
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list"}
    )
    cluster.add("v1/configmaps", "default", "a", configmap("a", rv="200"))
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    shop = "live/v1/configmaps/shop/x.yaml"  # no rule of the target selects namespace shop
    before = {B: "gone from the cluster\n", shop: "not compared\n"}
    await asyncio.to_thread(_seed_remote, remote, tmp_path / "bob", before)
    config = tmp_path / "one-namespace.yaml"
    await asyncio.to_thread(config.write_text, ONE_NAMESPACE.format(remote=remote))
    runtime = await asyncio.to_thread(
        lambda: Runtime(load_config([config]), Settings(state_dir=tmp_path / "state"))
    )
    await runtime.start()
    try:
        [target] = runtime.config.targets.values()
        results = await runtime.resync([target], cluster.client, ApiObjects(cluster.client))
        assert await runtime.flush() == []
    finally:
        await runtime.close()
    result = results[target.key]
    assert isinstance(result, ResyncResult) and (result.files_set, result.files_removed) == (1, 1)
    assert await asyncio.to_thread(git_files, remote) == [A, shop]


@pytest.mark.parametrize("value", ["-1", "0.5", "soon", "700000"])
def test_a_resync_interval_out_of_range_is_a_usage_error(value: str) -> None:
    command = [sys.executable, "-m", "audit_reverser", "serve", "--resync-interval", value]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert f"--resync-interval: {value!r} is not 0 (never) or a number of seconds" in done.stderr


TWO_TARGETS = """\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: default}}
spec: {{url: "file://{remote}", allowedBranches: ["main"]}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: live, namespace: default}}
spec: {{providerRef: {{name: origin}}, branch: main, path: live}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: backup, namespace: default}}
spec: {{providerRef: {{name: origin}}, branch: main, path: backup}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: live}}
spec:
  targetRef: {{name: live, namespace: default}}
  rules: [{{scope: Namespaced, resources: ["configmaps"]}}]
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: backup}}
spec:
  targetRef: {{name: backup, namespace: default}}
  rules: [{{scope: Namespaced, resources: ["configmaps"]}}]
"""


async def test_targets_selecting_the_same_resources_share_one_list_per_round(
    tmp_path: Path, cluster: Cluster
) -> None:
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list"}
    )
    cluster.add("v1/configmaps", "default", "a", configmap("a", rv="200"))
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    config = tmp_path / "two-targets.yaml"
    await asyncio.to_thread(config.write_text, TWO_TARGETS.format(remote=remote))
    runtime = await asyncio.to_thread(
        lambda: Runtime(load_config([config]), Settings(state_dir=tmp_path / "state"))
    )
    await runtime.start()
    stats = ResyncStats()
    objects = ApiObjects(cluster.client)

    async def run(targets: list[GitTarget]) -> dict[Key, ResyncResult | Exception]:
        return await runtime.resync(targets, cluster.client, objects)

    resyncer = Resyncer(
        interval_s=3600, targets=lambda: runtime.config.targets.values(), run=run, stats=stats
    )
    try:
        assert await resyncer.run()
        assert await runtime.flush() == []
    finally:
        await runtime.close()
    assert cluster.gets("/api/v1/configmaps") == 1
    assert dict(stats.commits) == {"default/live": 1, "default/backup": 1}
    assert await asyncio.to_thread(git_files, remote) == [
        "backup/v1/configmaps/default/a.yaml",
        A,
    ]
    subjects = await asyncio.to_thread(git, remote, "log", "--format=%s", "main")
    assert sorted(subjects.splitlines()) == ["[RESYNC] backup", "[RESYNC] live"]
