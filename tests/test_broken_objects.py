"""Rules from files: a broken object is reported and left out, and the healthy targets keep
working, as in a cluster (docs/reference.md, "Broken objects")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.conftest import (
    bare_repo,
    configmap,
    event,
    event_list,
    git_files,
    request,
    start_serve,
    write_config,
)
from tests.test_cli import _log_line, run

BROKEN = """---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {name: broken, namespace: team}
spec: {providerRef: {name: origin}, branch: dev, path: broken}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: orphan, namespace: team}
spec: {targetRef: {name: missing}, rules: [{resources: [configmaps]}]}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {name: locked, namespace: team}
spec: {url: "file:///nowhere.git", allowedBranches: ["*"], secretRef: {name: nope}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {name: locked, namespace: team}
spec: {providerRef: {name: locked}, branch: main, path: locked}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: to-the-broken-ones}
spec:
  targetRef: {name: broken, namespace: team}
  rules: [{scope: Namespaced, resources: ["*"]}]
"""


def _config(tmp_path: Path) -> tuple[Path, Path]:
    remote = bare_repo(tmp_path / "remote.git")
    return remote, write_config(tmp_path / "c.yaml", remote, max_commits=1, documents=BROKEN)


def _expected(config: Path) -> list[str]:
    """The problems, each with the file and document of the object (documents 1-3 are the
    healthy provider, target and rule)."""
    return [
        f"GitTarget team/broken: spec.branch: 'dev' is not allowed by GitProvider team/origin "
        f"(allowedBranches: ['main']) (in {config}: document 4)",
        "WatchRule team/orphan: spec.targetRef.name: GitTarget team/missing not found (a "
        f"WatchRule's target must be in its own namespace) (in {config}: document 5)",
        "GitProvider team/locked: spec.secretRef.name: Secret team/nope not found "
        f"(in {config}: document 6)",
    ]


def test_replay_writes_the_healthy_target_and_names_the_broken_ones(tmp_path: Path) -> None:
    remote, config = _config(tmp_path)
    log = tmp_path / "audit.log"
    log.write_bytes(_log_line(event("create", body=configmap())))
    done = run(
        "replay",
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "s"),
        str(log),
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert git_files(remote) == ["live/v1/configmaps/default/demo.yaml"]
    named = [
        line.removeprefix("audit-reverser: config error: left out: ")
        for line in done.stderr.splitlines()
        if line.startswith("audit-reverser: config error: left out: ")
    ]
    assert named == _expected(config)
    assert "Traceback" not in done.stderr


def test_check_exits_non_zero_naming_the_broken_objects(tmp_path: Path) -> None:
    _, config = _config(tmp_path)
    done = run("check", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "GitProvider team/origin:" in done.stdout and "  Ready" in done.stdout
    for problem in _expected(config):
        assert f"audit-reverser: config error: left out: {problem}" in done.stderr


def test_a_document_that_is_not_what_was_meant_still_refuses_to_start(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    typo = BROKEN.replace("branch: dev", "brnach: dev")
    config = write_config(tmp_path / "c.yaml", remote, documents=typo)
    done = run("replay", "--config", str(config), "x.log", cwd=tmp_path)
    assert done.returncode == 2
    assert "document 4 (GitTarget broken): spec.brnach: unknown field" in done.stderr
    assert git_files(remote) == []


async def test_serve_reports_broken_objects_and_the_healthy_target_commits(
    tmp_path: Path,
) -> None:
    remote, config = await asyncio.to_thread(_config, tmp_path)
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    served = await asyncio.to_thread(start_serve, tmp_path, *args)
    try:
        status, verbose = await asyncio.to_thread(request, served.port, "GET", "/readyz?verbose")
        assert status == 200
        for problem in _expected(config):
            assert f"[!]config warning: {problem}\n" in verbose.decode()
        body = json.dumps(event_list(event("create", body=configmap()))).encode()
        status, _ = await asyncio.to_thread(request, served.port, "POST", "/audit-webhook", body)
        assert status == 200
        async with asyncio.timeout(60):  # a bound against hangs, not a time to meet
            while await asyncio.to_thread(git_files, remote) == []:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        _, metrics = await asyncio.to_thread(request, served.port, "GET", "/metrics")
    finally:
        log = await asyncio.to_thread(served.stop)
    assert await asyncio.to_thread(git_files, remote) == ["live/v1/configmaps/default/demo.yaml"]
    for kind, name in (
        ("GitTarget", "team/broken"),
        ("WatchRule", "team/orphan"),
        ("GitProvider", "team/locked"),
    ):
        line = f'audit_reverser_config_problems{{kind="{kind}",object="{name}"}} 1.0'
        assert line in metrics.decode()
    assert f"ERROR audit_reverser.runtime: left out: {_expected(config)[0]}" in log
