"""Fleets: several clusters post to one receiver; none overwrites another's files, and each
cluster's objects are read from its own API (docs/fleet.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
import yarl

from audit_reverser.config import load_config
from audit_reverser.pipeline.home import HomeCluster
from audit_reverser.runtime import Runtime, Settings
from tests.conftest import (
    bare_repo,
    configmap,
    event,
    event_list,
    free_port,
    git,
    git_files,
    git_show,
    git_subjects,
    request,
    start_serve,
    write_config,
)
from tests.test_cli import _log_line, run
from tests.test_cluster import (
    CB,
    JSON,
    Kubectl,
    _assert_the_install_allows_every_request,
    _cr,
    _declare_crds,
    _kubeconfig,
)


def _post(port: int, path: str, *items: dict[str, object]) -> int:
    status, _ = request(port, "POST", path, json.dumps(event_list(*items)).encode(), headers=JSON)
    return status


def _trailer(repo: Path, path: str, name: str) -> list[str]:
    messages = git(repo, "log", "--format=%B%x00", "main", "--", path).split("\0")
    return [m for text in messages for m in re.findall(rf"^{name}: (.*)$", text, re.M)]


def test_two_clusters_on_the_embedded_default_keep_both_objects(tmp_path: Path) -> None:
    served = start_serve(tmp_path)
    try:
        for cluster in ("prod", "staging"):
            body = configmap(data={"cluster": cluster})
            assert (
                _post(served.port, f"/audit-webhook/{cluster}", event("create", body=body)) == 200
            )
        # Without a cluster name: exactly the single-cluster layout of before.
        plain = configmap(data={"cluster": "unnamed"})
        assert _post(served.port, "/audit-webhook", event("create", body=plain)) == 200
    finally:
        served.stop()
    repo = tmp_path / "audit-repo.git"
    assert git_files(repo) == [
        "live-cluster/prod/v1/configmaps/default/demo.yaml",
        "live-cluster/staging/v1/configmaps/default/demo.yaml",
        "live-cluster/v1/configmaps/default/demo.yaml",
    ]
    for cluster in ("prod", "staging"):
        path = f"live-cluster/{cluster}/v1/configmaps/default/demo.yaml"
        assert f"cluster: {cluster}" in git_show(repo, path)
        assert _trailer(repo, path, "Cluster") == [cluster]
    assert "cluster: unnamed" in git_show(repo, "live-cluster/v1/configmaps/default/demo.yaml")
    assert sorted(git_subjects(repo)) == [
        "[CREATE] prod/v1/configmaps/default/demo",
        "[CREATE] staging/v1/configmaps/default/demo",
        "[CREATE] v1/configmaps/default/demo",
    ]


def test_a_namespace_deleted_in_one_cluster_leaves_the_other_clusters_files(
    tmp_path: Path,
) -> None:
    """The unnamed cluster's Namespace shop is deleted: its objects in shop go, and the
    folders of the named clusters beside them (prod/..., staging/...) stay, though a
    cluster's folder sits where a group's would."""
    served = start_serve(tmp_path)
    shop = {"resource": "namespaces", "namespace": "shop", "name": "shop"}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
    try:
        for path in ("/audit-webhook/prod", "/audit-webhook/staging", "/audit-webhook"):
            body = configmap("cfg", "shop")
            assert (
                _post(served.port, path, event("create", namespace="shop", name="cfg", body=body))
                == 200
            )
        assert _post(served.port, "/audit-webhook", event("create", **shop, body=namespace)) == 200
        gone = {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
        assert _post(served.port, "/audit-webhook", event("delete", **shop, body=gone)) == 200
    finally:
        served.stop()
    assert git_files(tmp_path / "audit-repo.git") == [
        "live-cluster/prod/v1/configmaps/shop/cfg.yaml",
        "live-cluster/staging/v1/configmaps/shop/cfg.yaml",
    ]


def test_replay_of_a_named_cluster_writes_its_folder_and_refuses_bad_names(
    tmp_path: Path,
) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    log = tmp_path / "audit.log"
    log.write_bytes(_log_line(event("create", body=configmap())))
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    for cluster in ("prod", "staging"):
        done = run("replay", *state, "--cluster", cluster, str(log), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert git_files(remote) == [
        "live/prod/v1/configmaps/default/demo.yaml",
        "live/staging/v1/configmaps/default/demo.yaml",
    ]
    refused = run("replay", *state, "--cluster", "../up", str(log), cwd=tmp_path)
    assert refused.returncode == 2 and "'../up' is not a cluster name" in refused.stderr


@dataclass
class Member:
    api: kmock.KubernetesEmulator
    kubeconfig: dict[str, Any]
    api_url: str = ""


@pytest.fixture
async def clusters() -> AsyncIterator[dict[str, Member]]:
    """Two clusters, each its own kmock API, each with its own ConfigMap default/demo."""
    async with (
        kmock.KubernetesEmulator() as prod,
        kmock.Server(prod) as prod_server,
        kmock.KubernetesEmulator() as staging,
        kmock.Server(staging) as staging_server,
    ):
        found = {}
        for name, emulator, server in (
            ("prod", prod, prod_server),
            ("staging", staging, staging_server),
        ):
            emulator.resources["v1/configmaps"] = kmock.ResourceInfo(
                kind="ConfigMap", namespaced=True
            )
            emulator.objects["v1/configmaps", "default", "demo"] = configmap(
                data={"from": f"{name} api"}
            )
            found[name] = Member(emulator, _kubeconfig(server.url), str(server.url).rstrip("/"))
        yield found
        for member in found.values():
            _assert_the_install_allows_every_request(member.api)


async def test_each_cluster_s_objects_are_read_from_its_own_api(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    config = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote, max_commits=1)
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    for name, member in clusters.items():
        kubeconfig = tmp_path / f"{name}.kubeconfig"
        await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(member.kubeconfig))
        args += ["--cluster", f"{name}={kubeconfig}"]
    served = await asyncio.to_thread(start_serve, tmp_path, *args)
    try:
        # Metadata level: no object in the event, so it must come from the event's cluster.
        for name in ("prod", "staging", "dev"):
            item = event("update", level="Metadata", body=None, user=f"{name}@example.com")
            status = await asyncio.to_thread(_post, served.port, f"/audit-webhook/{name}", item)
            assert status == 200
        metrics = ""
        kept, skipped = "events_kept_total 2.0", 'skipped_total{reason="needs-api"} 1.0'
        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while kept not in metrics or skipped not in metrics:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
                _, body = await asyncio.to_thread(request, served.port, "GET", "/metrics")
                metrics = body.decode()
    finally:
        log = await asyncio.to_thread(served.stop)
    files = await asyncio.to_thread(git_files, remote)
    # dev has no API: its event is skipped and counted, never answered by another cluster.
    assert files == [
        "live/prod/v1/configmaps/default/demo.yaml",
        "live/staging/v1/configmaps/default/demo.yaml",
    ]
    for name, member in clusters.items():
        content = await asyncio.to_thread(git_show, remote, files[name == "staging"])
        assert f"from: {name} api" in content
        reads = [
            r for r in member.api if r.url.path == "/api/v1/namespaces/default/configmaps/demo"
        ]
        assert len(reads) == 1, f"{name}: {len(reads)} reads"
        assert f"cluster {name}: events at /audit-webhook/{name}" in log


async def test_a_fleet_without_rules_or_with_one_name_twice_is_refused(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "k"
    await asyncio.to_thread(kubeconfig.write_text, "{}")
    cases = [
        (
            ["--config", "x.yaml", "--cluster", f"a={kubeconfig}", "--cluster", f"a={kubeconfig}"],
            "each name once",
        ),
        (["--config", "x.yaml", "--cluster", "a"], "--cluster a needs --kubeconfig or"),
        (["--config", "x.yaml", "--cluster", "a="], "'a=' is not NAME=KUBECONFIG or NAME"),
        (
            ["--kubeconfig", str(kubeconfig), "--cluster", "a", "--cluster", f"b={kubeconfig}"],
            "--cluster NAME names the one cluster",
        ),
        (
            ["--config", "x.yaml", "--kubeconfig", str(kubeconfig), "--cluster", f"a={kubeconfig}"],
            "--cluster replaces --kubeconfig",
        ),
    ]
    for args, message in cases:
        done = await asyncio.to_thread(run, "serve", *args, cwd=tmp_path)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


async def test_a_receiver_with_one_cluster_s_api_keeps_that_cluster_s_layout(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    """serve --kubeconfig --config, posted to /audit-webhook/prod as production.md says:
    the files stay under the target's path, where snapshots and resyncs write too."""
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    config = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote, max_commits=1)
    kubeconfig = tmp_path / "prod.kubeconfig"
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(clusters["prod"].kubeconfig))
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    args += ["--kubeconfig", str(kubeconfig), "--resync-interval", "0"]
    served = await asyncio.to_thread(start_serve, tmp_path, *args)
    try:
        item = event("create", name="other", body=configmap("other"))
        assert await asyncio.to_thread(_post, served.port, "/audit-webhook/prod", item) == 200
        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while not await asyncio.to_thread(git_files, remote):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(served.stop)
    assert await asyncio.to_thread(git_files, remote) == ["live/v1/configmaps/default/other.yaml"]


async def _metrics_show(port: int, *wanted: str) -> None:
    metrics = ""
    async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
        while not all(w in metrics for w in wanted):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
            _, body = await asyncio.to_thread(request, port, "GET", "/metrics")
            metrics = body.decode()


async def _one_cluster_serve(
    tmp_path: Path, member: Member, remote: Path, *extra: str
) -> tuple[list[str], Any]:
    config = tmp_path / "c.yaml"
    if not await asyncio.to_thread(config.exists):
        await asyncio.to_thread(write_config, config, remote, max_commits=1)
    kubeconfig = tmp_path / "prod.kubeconfig"
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(member.kubeconfig))
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    args += ["--kubeconfig", str(kubeconfig), "--resync-interval", "0", *extra]
    return args, await asyncio.to_thread(start_serve, tmp_path, *args)


def _api_reads(member: Member, name: str = "demo") -> int:
    path = f"/api/v1/namespaces/default/configmaps/{name}"
    return len([r for r in member.api if r.url.path == path])


async def test_a_one_cluster_receiver_pins_the_first_name_and_keeps_other_clusters_apart(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    """serve --kubeconfig (prod's API) without a name: the first name posted is this
    receiver's, kept over a restart; staging's files go to its own folder and its events
    without their object are skipped, never answered from prod's API."""
    prod = clusters["prod"]
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    _, served = await _one_cluster_serve(tmp_path, prod, remote)
    try:
        metadata = event("update", level="Metadata", body=None, user="ana@example.com")
        assert await asyncio.to_thread(_post, served.port, "/audit-webhook/prod", metadata) == 200
        theirs = event("create", body=configmap(data={"from": "staging's event"}))
        for item in (
            theirs,
            event("update", level="Metadata", body=None, user="bob@example.com"),
            event("update", level="Metadata", body=None, user="carol@example.com"),
        ):
            assert (
                await asyncio.to_thread(_post, served.port, "/audit-webhook/staging", item) == 200
            )
        await _metrics_show(
            served.port, "events_kept_total 2.0", 'skipped_total{reason="needs-api"} 2.0'
        )
    finally:
        log = await asyncio.to_thread(served.stop)
    assert log.count("this receiver is cluster prod") == 1
    assert log.count("events posted to /audit-webhook/staging: this receiver reads") == 1
    assert await asyncio.to_thread(git_files, remote) == [
        "live/staging/v1/configmaps/default/demo.yaml",
        "live/v1/configmaps/default/demo.yaml",
    ]
    assert "from: prod api" in await asyncio.to_thread(
        git_show, remote, "live/v1/configmaps/default/demo.yaml"
    )
    assert "from: staging's event" in await asyncio.to_thread(
        git_show, remote, "live/staging/v1/configmaps/default/demo.yaml"
    )
    assert _api_reads(prod) == 1  # prod's event only

    # After a restart, staging posting first does not make the receiver staging's.
    _, served = await _one_cluster_serve(tmp_path, prod, remote)
    try:
        late = event("create", name="late", body=configmap("late"))
        assert await asyncio.to_thread(_post, served.port, "/audit-webhook/staging", late) == 200
        await _metrics_show(served.port, "events_kept_total 1.0")
    finally:
        log = await asyncio.to_thread(served.stop)
    assert "this receiver is cluster prod (pinned in" in log
    assert "live/staging/v1/configmaps/default/late.yaml" in await asyncio.to_thread(
        git_files, remote
    )


async def test_a_one_cluster_receiver_named_by_the_user_is_that_cluster_from_the_start(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    prod = clusters["prod"]
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    _, served = await _one_cluster_serve(tmp_path, prod, remote, "--cluster", "prod")
    try:
        # staging posts first; it still is not this receiver's cluster.
        for cluster, user in (("staging", "bob@example.com"), ("prod", "ana@example.com")):
            item = event("update", level="Metadata", body=None, user=user)
            path = f"/audit-webhook/{cluster}"
            assert await asyncio.to_thread(_post, served.port, path, item) == 200
        await _metrics_show(
            served.port, "events_kept_total 1.0", 'skipped_total{reason="needs-api"} 1.0'
        )
    finally:
        await asyncio.to_thread(served.stop)
    assert await asyncio.to_thread(git_files, remote) == ["live/v1/configmaps/default/demo.yaml"]
    cluster = await asyncio.to_thread(
        _trailer, remote, "live/v1/configmaps/default/demo.yaml", "Cluster"
    )
    assert cluster == ["prod"]
    assert _api_reads(prod) == 1
    pinned = tmp_path / "state" / "cluster-name"
    assert (await asyncio.to_thread(pinned.read_text)).strip() == "prod"


# -- a fleet whose rules are each cluster's own custom resources -----------------------------


def _own_rules(member: Member, remote: Path, namespace: str, targets: dict[str, str]) -> None:
    """In ``namespace``: GitProvider origin (the shared remote) and, per GitTarget name, the
    target (its folder given) with a WatchRule of the same name for the namespace's
    ConfigMaps."""
    emulator = member.api
    _declare_crds(emulator)
    emulator.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list"}
    )
    provider = {"url": f"file://{remote}", "allowedBranches": ["main"], "push": {"maxCommits": 1}}
    origin = _cr("GitProvider", "origin", provider, namespace)
    emulator.objects[f"{CB}/gitproviders", namespace, "origin"] = origin
    for name, path in targets.items():
        spec = {"providerRef": {"name": "origin"}, "branch": "main", "path": path}
        target = _cr("GitTarget", name, spec, namespace)
        target["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
        emulator.objects[f"{CB}/gittargets", namespace, name] = target
        rule = {"targetRef": {"name": name}, "rules": [{"resources": ["configmaps"]}]}
        emulator.objects[f"{CB}/watchrules", namespace, name] = _cr(
            "WatchRule", name, rule, namespace
        )


def _ready(member: Member, plural: str, namespace: str, name: str) -> tuple[str, str] | None:
    status = member.api.objects[f"{CB}/{plural}", namespace, name].get("status") or {}
    conditions = status.get("conditions") or []
    return (conditions[0]["status"], conditions[0]["reason"]) if conditions else None


async def test_a_fleet_reads_each_cluster_s_rules_from_its_own_custom_resources(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    """serve --cluster prod=… --cluster staging=…, no --config: prod's rules (namespace
    default) and staging's (namespace team) each apply to their own cluster's events, read
    from their own API; status goes back to each; staging's GitTarget that would write into
    prod's folder is refused."""
    prod, staging = clusters["prod"], clusters["staging"]
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    _own_rules(prod, remote, "default", {"live": "prod"})
    _own_rules(staging, remote, "team", {"live": "staging", "intruder": "prod/v1"})
    staging.api.objects["v1/configmaps", "team", "demo"] = configmap(
        namespace="team", data={"from": "staging api"}
    )
    args = ["--state-dir", str(tmp_path / "state")]
    for name, member in clusters.items():
        kubeconfig = tmp_path / f"{name}.kubeconfig"
        await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(member.kubeconfig))
        args += ["--cluster", f"{name}={kubeconfig}"]
    served = await asyncio.to_thread(start_serve, tmp_path, *args, "--resync-interval", "0")
    try:

        def reported() -> bool:  # status written, snapshots taken (their status says so)
            lives = ((prod, "default"), (staging, "team"))
            return (
                all(_ready(m, "gittargets", ns, "live") == ("True", "Ready") for m, ns in lives)
                and all(
                    "snapshot" in m.api.objects[f"{CB}/gittargets", ns, "live"]["status"]
                    for m, ns in lives
                )
                and _ready(staging, "gittargets", "team", "intruder") is not None
            )

        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while not reported():  # noqa: ASYNC110 - the state lives in the server
                await asyncio.sleep(0.05)
        # Changed since the snapshots: the Metadata-level events read the new state.
        prod.api.objects["v1/configmaps", "default", "demo"] = configmap(
            data={"from": "prod api, later"}, rv="200"
        )
        staging.api.objects["v1/configmaps", "team", "demo"] = configmap(
            namespace="team", data={"from": "staging api, later"}, rv="200"
        )
        posts = [
            ("prod", event("update", level="Metadata", body=None, user="ana@example.com")),
            (
                "staging",
                event(
                    "update", namespace="team", level="Metadata", body=None, user="bob@example.com"
                ),
            ),
            # Prod's rules select default's ConfigMaps, staging's do not: not staging's.
            ("staging", event("create", name="other", body=configmap("other"))),
            ("dev", event("create", name="other", body=configmap("other"))),  # no such cluster
        ]
        for cluster, item in posts:
            path = f"/audit-webhook/{cluster}"
            assert await asyncio.to_thread(_post, served.port, path, item) == 200
        await _metrics_show(
            served.port, "events_kept_total 2.0", 'skipped_total{reason="no-rule"} 2.0'
        )
        # A GitTarget made later in prod, the first cluster, into staging's folder: the
        # later one is refused, whichever cluster it is in.
        late = {"providerRef": {"name": "origin"}, "branch": "main", "path": "staging/more"}
        late_target = _cr("GitTarget", "late", late, "default")
        late_target["metadata"]["creationTimestamp"] = "2026-06-01T00:00:00Z"
        await Kubectl(prod.api_url).apply("gittargets", late_target)
        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while _ready(prod, "gittargets", "default", "late") is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert _ready(prod, "gittargets", "default", "late") == ("False", "FolderInUse")
    finally:
        log = await asyncio.to_thread(served.stop)
    assert await asyncio.to_thread(git_files, remote) == [
        "prod/v1/configmaps/default/demo.yaml",
        "staging/v1/configmaps/team/demo.yaml",
    ]
    for path, text, author in (
        ("prod/v1/configmaps/default/demo.yaml", "from: prod api, later", "ana@example.com"),
        ("staging/v1/configmaps/team/demo.yaml", "from: staging api, later", "bob@example.com"),
    ):
        assert text in await asyncio.to_thread(git_show, remote, path)
        authors = await asyncio.to_thread(git, remote, "log", "--format=%an", "main", "--", path)
        assert authors.split()[0] == author
    # Status went to the cluster each object came from; the intruder says why it waits.
    assert _ready(prod, "gitproviders", "default", "origin") == ("True", "Ready")
    assert _ready(staging, "gitproviders", "team", "origin") == ("True", "Ready")
    assert _ready(staging, "gittargets", "team", "intruder") == ("False", "FolderInUse")
    status = staging.api.objects[f"{CB}/gittargets", "team", "intruder"]["status"]
    assert "GitTarget default/live of cluster prod" in status["conditions"][0]["message"]
    for member, namespace in ((prod, "default"), (staging, "team")):
        patched = {r.url.path for r in member.api if str(r.method).endswith("PATCH")}
        assert patched and all(f"/namespaces/{namespace}/" in p for p in patched), patched
    assert "ERROR" in log and "is written by GitTarget default/live of cluster prod" in log
    assert log.count("events posted to /audit-webhook/dev: no cluster of that name") == 1
    # Each new GitTarget was snapshotted from its own cluster first.
    subjects = await asyncio.to_thread(git_subjects, remote)
    assert sorted(subjects) == [
        "[SNAPSHOT] prod",
        "[SNAPSHOT] staging",
        "[UPDATE] v1/configmaps/default/demo",
        "[UPDATE] v1/configmaps/team/demo",
    ]
    for path, text in (
        ("prod/v1/configmaps/default/demo.yaml", "from: prod api\n"),
        ("staging/v1/configmaps/team/demo.yaml", "from: staging api\n"),
    ):
        history = await asyncio.to_thread(
            git, remote, "log", "--reverse", "--format=%H", "main", "--", path
        )
        first = f"{history.split()[0]}:{path}"
        assert text in await asyncio.to_thread(git, remote, "show", first)

    # Changes made while the receiver was away: the resync at start reads each target's
    # objects from its own cluster (the snapshots are done: their status says so).
    prod.api.objects["v1/configmaps", "default", "demo"] = configmap(
        data={"from": "prod api, missed"}, rv="300"
    )
    staging.api.objects["v1/configmaps", "team", "demo"] = configmap(
        namespace="team", data={"from": "staging api, missed"}, rv="300"
    )
    served = await asyncio.to_thread(start_serve, tmp_path, *args)
    try:
        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while len(await asyncio.to_thread(git_subjects, remote)) < 6:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(served.stop)
    subjects = await asyncio.to_thread(git_subjects, remote)
    assert sorted(subjects[-2:]) == ["[RESYNC] prod", "[RESYNC] staging"]
    for path, text in (
        ("prod/v1/configmaps/default/demo.yaml", "from: prod api, missed"),
        ("staging/v1/configmaps/team/demo.yaml", "from: staging api, missed"),
    ):
        assert text in await asyncio.to_thread(git_show, remote, path)


def test_a_cluster_name_the_user_gives_replaces_the_pinned_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "cluster-name").write_text("kind\n")
    assert HomeCluster.load(tmp_path).name == "kind"
    home = HomeCluster.load(tmp_path, "prod")
    assert "this receiver is cluster prod (--cluster), it was kind" in caplog.text
    assert home.owns("prod") and home.owns("") and not home.owns("kind")
    assert (tmp_path / "cluster-name").read_text() == "prod\n"
    assert HomeCluster.load(tmp_path).name == "prod"


# -- a cluster whose API is down at start -----------------------------------------------------


async def test_a_cluster_down_at_start_joins_later_and_the_others_run_meanwhile(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    """serve --cluster prod=… --cluster staging=…, staging's API not up: the receiver starts
    with prod; staging's batches get 503 (the apiserver sends them again) and it is shown as
    a problem; once its API is up, its rules are read, its events committed, its status
    written."""
    prod = clusters["prod"]
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    _own_rules(prod, remote, "default", {"live": "prod"})
    port = free_port()
    async with kmock.KubernetesEmulator() as emulator:
        staging = Member(emulator, _kubeconfig(yarl.URL(f"http://127.0.0.1:{port}")))
        _own_rules(staging, remote, "team", {"live": "staging"})
        staging.api.objects["v1/configmaps", "team", "demo"] = configmap(
            namespace="team", data={"from": "staging api"}
        )
        # Snapshotted by an earlier run: what it missed comes from the resync when it joins.
        live = staging.api.objects[f"{CB}/gittargets", "team", "live"]
        live["status"] = {"snapshot": {"lastCompletedTime": "2026-01-01T00:00:00Z"}}
        args = ["--state-dir", str(tmp_path / "state"), "--resync-interval", "3600"]
        for name, member in (("prod", prod), ("staging", staging)):
            kubeconfig = tmp_path / f"{name}.kubeconfig"
            await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(member.kubeconfig))
            args += ["--cluster", f"{name}={kubeconfig}"]
        served = await asyncio.to_thread(start_serve, tmp_path, *args)
        try:
            prod.api.objects["v1/configmaps", "default", "mine"] = configmap("mine")
            ours = event("create", name="mine", body=configmap("mine"), user="ana@example.com")
            assert await asyncio.to_thread(_post, served.port, "/audit-webhook/prod", ours) == 200
            theirs = event(
                "create", namespace="team", body=configmap(namespace="team"), user="bob@example.com"
            )
            status, body = await asyncio.to_thread(
                request,
                served.port,
                "POST",
                "/audit-webhook/staging",
                json.dumps(event_list(theirs)).encode(),
                headers=JSON,
            )
            refused = json.loads(body)
            assert (status, refused["details"]["retryAfterSeconds"]) == (503, 10), refused
            assert "rules of cluster staging are not read yet" in refused["message"]
            ready, text = await asyncio.to_thread(request, served.port, "GET", "/readyz?verbose")
            assert ready == 200, text
            assert "[!]config warning: Cluster staging: the rules of cluster staging" in (
                text.decode()
            )
            await _metrics_show(
                served.port,
                'config_problems{kind="Cluster",object="staging"} 1.0',
                "events_kept_total 1.0",
            )
            async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
                while "prod/v1/configmaps/default/mine.yaml" not in await asyncio.to_thread(  # noqa: ASYNC110
                    git_files, remote
                ):
                    await asyncio.sleep(0.05)

            async with kmock.Server(emulator, port=port):  # staging's API comes up
                async with asyncio.timeout(120):  # a bound against hangs, not a time to meet
                    while _ready(staging, "gittargets", "team", "live") != ("True", "Ready"):  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
                    while "[RESYNC] staging" not in await asyncio.to_thread(  # noqa: ASYNC110
                        git_subjects, remote
                    ):
                        await asyncio.sleep(0.1)
                    while True:
                        status, _ = await asyncio.to_thread(
                            request,
                            served.port,
                            "POST",
                            "/audit-webhook/staging",
                            json.dumps(event_list(theirs)).encode(),
                            headers=JSON,
                        )
                        if status == 200:
                            break
                        assert status == 503
                        await asyncio.sleep(0.1)
                await _metrics_show(served.port, "events_kept_total 2.0")
                _, text = await asyncio.to_thread(request, served.port, "GET", "/readyz?verbose")
                assert "Cluster staging" not in text.decode()
                log = await asyncio.to_thread(served.stop)
            _assert_the_install_allows_every_request(emulator)
        finally:
            if served.process.poll() is None:
                await asyncio.to_thread(served.stop)
    files = await asyncio.to_thread(git_files, remote)
    assert "prod/v1/configmaps/default/mine.yaml" in files
    assert "staging/v1/configmaps/team/demo.yaml" in files
    authors = await asyncio.to_thread(
        git, remote, "log", "--format=%an", "main", "--", "staging/v1/configmaps/team/demo.yaml"
    )
    assert "bob@example.com" in authors.split()
    assert log.count("cluster staging: rules not read") == 1
    assert re.search(r"ERROR .*cluster staging: rules not read: .*127\.0\.0\.1", log), log
    assert re.search(r"INFO .*cluster staging: rules read \(1 GitTargets\)", log), log
    assert _ready(staging, "gitproviders", "team", "origin") == ("True", "Ready")
    # Staging's GitTarget, snapshotted before, was resynced when staging joined.
    subjects = await asyncio.to_thread(git_subjects, remote)
    assert "[RESYNC] staging" in subjects and "[SNAPSHOT] staging" not in subjects
    history = await asyncio.to_thread(
        git, remote, "log", "--reverse", "--format=%H", "main", "--", "staging"
    )
    first = f"{history.split()[0]}:staging/v1/configmaps/team/demo.yaml"
    assert "from: staging api" in await asyncio.to_thread(git, remote, "show", first)


# -- a fleet with rules from files: each cluster's folder resynced with its own API -----------


async def test_a_fleet_with_rules_from_files_resyncs_each_cluster_s_folder_with_its_own_api(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    """serve --config --cluster prod=… --cluster staging=…: the resync at start writes
    live/<cluster>/ from that cluster's API; after a restart, a change missed while away and
    an object deleted meanwhile change that cluster's folder only."""
    prod, staging = clusters["prod"], clusters["staging"]
    for member in (prod, staging):
        member.api.resources["v1/configmaps"] = kmock.ResourceInfo(
            kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch"}
        )
        member.api.objects["v1/configmaps", "default", "gone"] = configmap("gone")
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    config = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote, max_commits=1)
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    for name, member in clusters.items():
        kubeconfig = tmp_path / f"{name}.kubeconfig"
        await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(member.kubeconfig))
        args += ["--cluster", f"{name}={kubeconfig}"]
    files = [
        f"live/{name}/v1/configmaps/default/{object}.yaml"
        for name in ("prod", "staging")
        for object in ("demo", "gone")
    ]

    async def resynced(*wanted: str) -> str:
        served = await asyncio.to_thread(start_serve, tmp_path, *args)
        try:
            await _metrics_show(served.port, 'resync_runs_total{result="ok"} 1.0', *wanted)
        finally:
            log = await asyncio.to_thread(served.stop)
        return log

    log = await resynced()
    assert await asyncio.to_thread(git_files, remote) == files
    assert sorted(await asyncio.to_thread(git_subjects, remote)) == [
        "[RESYNC] live/prod",
        "[RESYNC] live/staging",
    ]
    for name in ("prod", "staging"):
        shown = await asyncio.to_thread(git_show, remote, files[2 * (name == "staging")])
        assert f"from: {name} api" in shown
    assert "resync: 2 GitTargets (0 failed), 4 objects" in log

    # While the receiver is away: prod's gone is deleted, staging's demo changes.
    del prod.api.objects["v1/configmaps", "default", "gone"]
    staging.api.objects["v1/configmaps", "default", "demo"] = configmap(
        data={"from": "staging api, missed"}, rv="300"
    )
    log = await resynced(  # counted per cluster's target
        'resync_files_removed_total{target="prod:team/live"} 1.0',
        'resync_files_updated_total{target="staging:team/live"} 1.0',
    )
    assert await asyncio.to_thread(git_files, remote) == [files[0], *files[2:]]
    # The last two commits: one per cluster, each touching its own folder only.
    latest = await asyncio.to_thread(
        git, remote, "log", "-2", "--format=%x00%s", "--name-status", "main"
    )
    touched = {
        entry.split("\n")[0]: [line.split("\t") for line in entry.split("\n")[1:] if line]
        for entry in latest.split("\0")
        if entry
    }
    assert touched == {
        "[RESYNC] live/prod": [["D", "live/prod/v1/configmaps/default/gone.yaml"]],
        "[RESYNC] live/staging": [["M", "live/staging/v1/configmaps/default/demo.yaml"]],
    }
    for name in ("prod", "staging"):
        body = await asyncio.to_thread(
            git, remote, "log", "-1", "--format=%B", "main", "--", f"live/{name}"
        )
        assert f"Cluster: {name}" in body and "Target: team/live" in body
    assert "from: staging api, missed" in await asyncio.to_thread(git_show, remote, files[2])
    assert "from: prod api" in await asyncio.to_thread(git_show, remote, files[0])
    assert "resync: 2 GitTargets (0 failed), 3 objects, 1 files updated, 1 removed" in log


async def test_in_a_fleet_with_rules_from_files_a_cluster_that_is_down_fails_only_its_own(
    tmp_path: Path, clusters: dict[str, Member]
) -> None:
    """staging's API does not answer: prod's folder is resynced, staging's resync is
    tried again; staging's events that carry their object are written."""
    prod = clusters["prod"]
    prod.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list", "watch"}
    )
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    config = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote, max_commits=1)
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    down = _kubeconfig(yarl.URL(f"http://127.0.0.1:{free_port()}"))
    for name, kubeconfig_of in (("prod", prod.kubeconfig), ("staging", down)):
        kubeconfig = tmp_path / f"{name}.kubeconfig"
        await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(kubeconfig_of))
        args += ["--cluster", f"{name}={kubeconfig}"]
    served = await asyncio.to_thread(start_serve, tmp_path, *args)
    try:
        item = event("create", name="theirs", body=configmap("theirs"))
        assert await asyncio.to_thread(_post, served.port, "/audit-webhook/staging", item) == 200
        await _metrics_show(
            served.port,
            'resync_runs_total{result="failed"} 1.0',
            'resync_commits_total{target="prod:team/live"} 1.0',
            "events_kept_total 1.0",
        )
        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while len(await asyncio.to_thread(git_files, remote)) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        log = await asyncio.to_thread(served.stop)
    assert await asyncio.to_thread(git_files, remote) == [
        "live/prod/v1/configmaps/default/demo.yaml",
        "live/staging/v1/configmaps/default/theirs.yaml",
    ]
    assert "resync: 1 GitTargets (1 failed)" in log
    assert re.search(r"WARNING .*resync of GitTarget staging:team/live: .*127\.0\.0\.1", log)


async def test_events_taken_for_a_cluster_whose_rules_are_not_read_wait_in_the_journal(
    tmp_path: Path,
) -> None:
    """An event the last run took for a cluster still away at this start is neither routed
    nor skipped: it stays in the journal, and a start with that cluster's rules commits it."""
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    path = await asyncio.to_thread(write_config, tmp_path / "c.yaml", remote, max_commits=1)
    config = await asyncio.to_thread(load_config, [path])
    settings = Settings(state_dir=tmp_path / "state", journal=True)
    config = dataclasses.replace(config, cluster_folders=True)
    away = dataclasses.replace(config, waiting={"staging": "its API is down"})
    for rules in (away, config):
        runtime = await asyncio.to_thread(Runtime, rules, settings)
        await runtime.start()
        try:
            if rules is away:
                triage = runtime.intake.triage(
                    [event("create", body=configmap())], cluster="staging"
                )
                await runtime.intake.accept(triage, cluster="staging")
            assert await runtime.flush() == []
        finally:
            await runtime.close()
        if rules is away:
            assert await asyncio.to_thread(git_files, remote) == []
            assert runtime.stats.skipped == {}
    assert await asyncio.to_thread(git_files, remote) == [
        "live/staging/v1/configmaps/default/demo.yaml"
    ]
