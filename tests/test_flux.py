"""A Flux GitRepository as a GitTarget's provider: from the config files, and from a cluster
(in test_cluster.py: kmock serving the GitRepository resource, or not, as without Flux)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from audit_reverser.cli import main
from audit_reverser.config.loader import load_config
from audit_reverser.config.model import Key
from audit_reverser.errors import ConfigError
from audit_reverser.runtime import Runtime, Settings
from tests.conftest import bare_repo, configmap, event, git, git_files
from tests.gitservers import GitHttpServer, KeyPair, SshServer

CB = "configbutler.ai/v1alpha1"
FLUX = "source.toolkit.fluxcd.io/v1"
FLUX_REF = {"group": "source.toolkit.fluxcd.io", "kind": "GitRepository", "name": "origin"}
FLUX_KEY = Key(namespace="team", name="origin", kind="GitRepository")


def git_repository(url: str, secret: str | None = None, name: str = "origin") -> dict[str, Any]:
    """A GitRepository as Flux users write it: what Flux reads (ref, interval) included."""
    spec: dict[str, Any] = {"url": url, "interval": "1m", "ref": {"branch": "main"}}
    if secret is not None:
        spec["secretRef"] = {"name": secret}
    metadata = {"name": name, "namespace": "team"}
    return {"apiVersion": FLUX, "kind": "GitRepository", "metadata": metadata, "spec": spec}


def _cr(
    kind: str, name: str, spec: dict[str, Any], namespace: str | None = "team"
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": CB, "kind": kind, "metadata": metadata, "spec": spec}


def target(name: str, provider_ref: dict[str, Any], branch: str = "main") -> dict[str, Any]:
    return _cr("GitTarget", name, {"providerRef": provider_ref, "branch": branch, "path": name})


def every_configmap(target_name: str) -> dict[str, Any]:
    rule = {
        "targetRef": {"name": target_name, "namespace": "team"},
        "rules": [{"scope": "Namespaced", "resources": ["configmaps"]}],
    }
    return _cr("ClusterWatchRule", f"to-{target_name}", rule, None)


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "team"}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "stringData": data}


async def write_documents(path: Path, *documents: dict[str, Any]) -> Path:
    await asyncio.to_thread(path.write_text, yaml.safe_dump_all(documents))
    return path


async def run_once(config_file: Path, state: Path, *names: str) -> list[str]:
    """Start a runtime on ``config_file``, send a ConfigMap create per name, flush, close;
    the push failures."""
    config = await asyncio.to_thread(load_config, [config_file])
    runtime = await asyncio.to_thread(Runtime, config, Settings(state_dir=state))
    await runtime.start()
    try:
        for name in names:
            items = [event("create", name=name, body=configmap(name), user="jane@example.com")]
            await runtime.intake.accept(runtime.intake.triage(items))
        return await runtime.flush()
    finally:
        await runtime.close()


# -- file mode ------------------------------------------------------------------------------


async def test_a_git_repository_in_the_config_files_stands_in_for_a_provider(
    tmp_path: Path,
) -> None:
    """Over file://: a GitRepository and a GitProvider of the same name are two providers,
    and the GitTarget's branch (not Flux's spec.ref.branch) is the branch written."""
    flux_remote = await asyncio.to_thread(bare_repo, tmp_path / "flux.git")
    own_remote = await asyncio.to_thread(bare_repo, tmp_path / "own.git")
    own = {"url": f"file://{own_remote}", "allowedBranches": ["main"]}
    config = await write_documents(
        tmp_path / "config.yaml",
        git_repository(f"file://{flux_remote}"),
        _cr("GitProvider", "origin", own),
        target("viaflux", FLUX_REF, branch="audit"),
        target("own", {"name": "origin"}),
        every_configmap("viaflux"),
        every_configmap("own"),
    )
    assert await run_once(config, tmp_path / "state", "demo") == []
    assert await asyncio.to_thread(git_files, flux_remote, "audit") == [
        "viaflux/v1/configmaps/default/demo.yaml"
    ]
    assert await asyncio.to_thread(git_files, flux_remote, "main") == []  # Flux's branch
    assert await asyncio.to_thread(git_files, own_remote) == ["own/v1/configmaps/default/demo.yaml"]


async def test_flux_style_ssh_keys_and_a_signing_key_in_the_same_secret(
    tmp_path: Path, sshd: SshServer
) -> None:
    """Flux's Secret keys over a real sshd: identity (encrypted; its passphrase under
    password) and known_hosts; signingKey beside them signs the commits."""
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    deploy_key = await asyncio.to_thread(KeyPair, "flux passphrase")
    await asyncio.to_thread(sshd.authorize, deploy_key.public)
    signing = KeyPair()
    credentials = {
        "identity": deploy_key.private,
        "password": "flux passphrase",
        "known_hosts": sshd.known_hosts,
        "signingKey": signing.private,
        "committerName": "Audit Bot",
        "committerEmail": "bot@example.com",
    }
    config = await write_documents(
        tmp_path / "config.yaml",
        git_repository(sshd.url(remote), secret="flux-ssh"),
        secret("flux-ssh", credentials),
        target("live", FLUX_REF),
        every_configmap("live"),
    )
    assert await run_once(config, tmp_path / "state", "demo") == []
    assert await asyncio.to_thread(git_files, remote) == ["live/v1/configmaps/default/demo.yaml"]
    signers = tmp_path / "allowed_signers"
    allowed = f'bot@example.com namespaces="git" {signing.public}\n'
    await asyncio.to_thread(signers.write_text, allowed)
    shown = await asyncio.to_thread(
        git,
        remote,
        "-c",
        f"gpg.ssh.allowedSignersFile={signers}",
        "log",
        "--format=%G? %an %cn",
        "main",
    )
    assert shown.strip() == "G jane@example.com Audit Bot"


async def test_a_flux_bearer_token_authenticates_over_https(tmp_path: Path) -> None:
    token = "flux-b3arer-t0ken"
    server = GitHttpServer(tmp_path, username=None, password=token)
    await asyncio.to_thread(server.start)
    try:
        remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
        config = await write_documents(
            tmp_path / "config.yaml",
            git_repository(server.url(remote), secret="flux-https"),
            secret("flux-https", {"bearerToken": token}),
            target("live", FLUX_REF),
            every_configmap("live"),
        )
        assert await run_once(config, tmp_path / "state", "demo") == []
    finally:
        await asyncio.to_thread(server.stop)
    assert await asyncio.to_thread(git_files, remote) == ["live/v1/configmaps/default/demo.yaml"]
    assert all(token not in line for line in server.requests)


async def test_what_is_wrong_with_a_flux_reference_is_named(tmp_path: Path) -> None:
    github = git_repository("https://github.com/o/r.git", name="workload")
    github["spec"]["provider"] = "github"
    config = await write_documents(
        tmp_path / "config.yaml",
        target("missing", FLUX_REF),
        target("ungrouped", {"kind": "GitRepository", "name": "origin"}),
        target("identity", {**FLUX_REF, "name": "workload"}),
        github,
        git_repository("file:///srv/a.git", name="twice"),
        git_repository("file:///srv/b.git", name="twice"),
    )
    with pytest.raises(ConfigError) as raised:
        await asyncio.to_thread(load_config, [config])
    problems = raised.value.problems
    assert (
        "GitTarget team/missing: spec.providerRef.name: GitRepository team/origin not found"
        f" (in {config}: document 1)" in problems
    )
    assert any(
        "(GitTarget ungrouped): spec.providerRef.group: a GitRepository is in "
        "'source.toolkit.fluxcd.io'" in p
        for p in problems
    )
    assert any(
        "(GitRepository workload): spec.provider: 'github' (workload identity) is not supported"
        in p
        for p in problems
    )
    assert any("duplicate GitRepository team/twice" in p for p in problems)


def test_check_probes_a_git_repository_like_a_provider(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = tmp_path / "config.yaml"
    documents = [git_repository(f"file://{remote}"), target("live", FLUX_REF, branch="audit")]
    config.write_text(yaml.safe_dump_all(documents))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(["check", "--config", str(config)])
    assert status == 0
    assert out.getvalue().startswith(f"GitRepository team/origin: {remote} branch audit\n")
