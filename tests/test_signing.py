"""SSH-signed commits: what we commit carries a signature that plain git and ssh-keygen accept.

Keys are made by ssh-keygen, as users make them; every verdict comes from
``git verify-commit`` (gpg.format=ssh, an allowed-signers file) and from
``ssh-keygen -Y verify`` on the signature taken out of the raw commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, rsa

from audit_reverser.cli import main
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.rules import ClusterRules
from audit_reverser.cluster.status import StatusReporter
from audit_reverser.encryption.sshsig import SigningKey
from audit_reverser.errors import ConfigError
from audit_reverser.pipeline.filter import Skip
from audit_reverser.runtime import Runtime, Settings
from tests.conftest import (
    CORPUS,
    bare_repo,
    configmap,
    event,
    event_list,
    eventually,
    git,
    git_files,
    request,
    start_harness,
    start_serve,
    write_config,
)
from tests.test_cluster import CB, Cluster, _declare_crds, _one_target, cluster  # noqa: F401
from tests.test_conflicts import _other_tool_commit

COMMITTER = {"committerName": "Audit Bot", "committerEmail": "audit-bot@example.com"}


@dataclass
class Key:
    private: str
    public: str  # "ssh-ed25519 AAAA... comment"
    fingerprint: str  # as ssh-keygen -l prints it
    passphrase: str = ""

    def secret(self, **more: str) -> dict[str, str]:
        """The GitProvider Secret's keys for signing as COMMITTER."""
        data = {"signingKey": self.private, **COMMITTER}
        if self.passphrase:
            data["signingKeyPassphrase"] = self.passphrase
        return {**data, **more}


def make_key(
    folder: Path, kind: str = "ed25519", passphrase: str = "", name: str = "signing"
) -> Key:
    path = folder / f"{name}-{kind}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "bot", "-f", str(path)],
        check=True,
    )
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{path}.pub"], check=True, capture_output=True, text=True
    )
    return Key(
        private=path.read_text(),
        public=path.with_suffix(".pub").read_text().strip(),
        fingerprint=listed.stdout.split()[1],
        passphrase=passphrase,
    )


# -- verification, as a user (or a forge) does it ------------------------------------------------


def allowed_signers(folder: Path, key: Key) -> Path:
    path = folder / "allowed_signers"
    path.write_text(f'{COMMITTER["committerEmail"]} namespaces="git" {key.public}\n')
    return path


def verify_commit(repo: Path, commit: str, signers: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "gpg.format=ssh",
            "-c",
            f"gpg.ssh.allowedSignersFile={signers}",
            "verify-commit",
            commit,
        ],
        capture_output=True,
        text=True,
    )


def split_signature(raw: bytes) -> tuple[bytes, bytes]:
    """The signed payload (the commit without its gpgsig header) and the armored signature."""
    header, _, message = raw.partition(b"\n\n")
    kept: list[bytes] = []
    signature: list[bytes] = []
    in_signature = False
    for line in header.split(b"\n"):
        if line.startswith(b"gpgsig "):
            in_signature = True
            signature.append(line.removeprefix(b"gpgsig "))
        elif in_signature and line.startswith(b" "):
            signature.append(line[1:])
        else:
            in_signature = False
            kept.append(line)
    return b"\n".join(kept) + b"\n\n" + message, b"\n".join(signature) + b"\n"


def ssh_keygen_verify(
    folder: Path,
    payload: bytes,
    signature: bytes,
    signers: Path,
    identity: str = COMMITTER["committerEmail"],
) -> bool:
    sig_file = folder / "commit.sig"
    sig_file.write_bytes(signature)
    done = subprocess.run(
        ["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", identity]
        + ["-n", "git", "-s", str(sig_file)],
        input=payload,
        capture_output=True,
    )
    return done.returncode == 0


def our_commits(repo: Path) -> list[str]:
    """The commits on main that we made (committed by COMMITTER), newest first."""
    lines = git(repo, "log", "--format=%H %ce", "main").splitlines()
    return [c for c, email in map(str.split, lines) if email == COMMITTER["committerEmail"]]


def assert_all_signed(repo: Path, key: Key, folder: Path, *, at_least: int = 1) -> list[str]:
    """Every commit of ours verifies with git and with ssh-keygen; returns their ids."""
    signers = allowed_signers(folder, key)
    ours = our_commits(repo)
    assert len(ours) >= at_least, git(repo, "log", "--format=%H %cn <%ce> %s", "main")
    for commit in ours:
        verdict = verify_commit(repo, commit, signers)
        assert verdict.returncode == 0, verdict.stderr
        assert f'Good "git" signature for {COMMITTER["committerEmail"]}' in verdict.stderr
        assert key.fingerprint in verdict.stderr
        raw = subprocess.run(
            ["git", "-C", str(repo), "cat-file", "commit", commit], check=True, capture_output=True
        ).stdout
        payload, signature = split_signature(raw)
        assert signature.startswith(b"-----BEGIN SSH SIGNATURE-----\n")
        assert ssh_keygen_verify(folder, payload, signature, signers)
    return ours


# -- replay, serve, snapshot, a replay onto a moved remote -----------------------------------------


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit_reverser", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_replayed_audit_logs_become_commits_that_git_verifies(tmp_path: Path) -> None:
    key = make_key(tmp_path, passphrase="correct horse")
    logs = [str(f) for f in sorted(CORPUS.glob("*.jsonl"))]
    heads = []
    for name in ("one", "two"):
        remote = bare_repo(tmp_path / f"{name}.git")
        config = write_config(tmp_path / f"{name}.yaml", remote, secret=key.secret())
        state = ["--state-dir", str(tmp_path / name)]
        result = run("replay", "--config", str(config), *state, *logs, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        heads.append(assert_all_signed(remote, key, tmp_path, at_least=2))
        assert git(remote, "log", "-1", "--format=%cn <%ce>", "main").strip() == (
            "Audit Bot <audit-bot@example.com>"
        )
    # Ed25519 signatures are deterministic: the same input still gives the same commit ids.
    assert heads[0] == heads[1]


def test_commits_received_by_serve_are_signed(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote, secret=key.secret())
    served = start_serve(tmp_path, "--config", str(config), "--state-dir", str(tmp_path / "st"))
    try:
        body = json.dumps(event_list(event("create", body=configmap()))).encode()
        assert request(served.port, "POST", "/audit-webhook", body)[0] == 200
    finally:
        log = served.stop()
    assert git_files(remote) == ["live/v1/configmaps/default/demo.yaml"], log
    assert_all_signed(remote, key, tmp_path)


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
async def test_ecdsa_and_rsa_keys_sign_too(tmp_path: Path, kind: str) -> None:
    key = await asyncio.to_thread(make_key, tmp_path, kind)
    harness = await start_harness(tmp_path, secret=key.secret())
    try:
        await harness.send(event("create", body=configmap()))
        await harness.sync()
    finally:
        await harness.runtime.close()
    await asyncio.to_thread(assert_all_signed, harness.remote, key, tmp_path)


async def test_commits_replayed_onto_a_moved_remote_are_signed_again(tmp_path: Path) -> None:
    key = await asyncio.to_thread(make_key, tmp_path)
    harness = await start_harness(tmp_path, secret=key.secret())
    try:
        await harness.send(event("create", name="a", body=configmap("a")))
        await harness.sync()
        await harness.send(event("update", name="a", body=configmap("a", data={"v": "2"})))
        [writer] = harness.runtime.writers.values()
        await harness.runtime.intake.drain()
        await eventually(lambda: writer.stats.commits >= 2)
        before = writer.mirror.tip
        await asyncio.to_thread(
            _other_tool_commit, harness.remote, tmp_path / "bob", {"x.txt": "x\n"}, "Bob's"
        )
        await harness.sync()
    finally:
        await harness.runtime.close()
    assert writer.mirror.replays == 1
    assert await harness.log("%s") == [
        "[CREATE] v1/configmaps/default/a",
        "Bob's",
        "[UPDATE] v1/configmaps/default/a",
    ]
    ours = await asyncio.to_thread(assert_all_signed, harness.remote, key, tmp_path, at_least=2)
    assert before not in ours  # the replayed commit is a new, newly signed commit


async def test_snapshot_and_prune_commits_are_signed(tmp_path: Path, cluster: Cluster) -> None:  # noqa: F811
    cluster.api.resources["v1/configmaps"] = kmock.ResourceInfo(
        kind="ConfigMap", namespaced=True, verbs={"get", "list"}
    )
    cluster.add("v1/configmaps", "default", "a", configmap("a"))
    key = await asyncio.to_thread(make_key, tmp_path)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    await asyncio.to_thread(
        _other_tool_commit,
        remote,
        tmp_path / "bob",
        {"live/v1/configmaps/default/old.yaml": "gone\n"},
        "before",
    )
    harness = await start_harness(tmp_path, secret=key.secret(), source=ApiObjects(cluster.client))
    runtime = harness.runtime
    [target] = runtime.config.targets.values()
    try:
        result = await runtime.take_snapshot(target, cluster.client, ApiObjects(cluster.client))
        await harness.sync()
    finally:
        await runtime.close()
    assert result is not None and (result.written, result.pruned) == (True, True)
    # No user made these: they are authored by the configured committer, and signed.
    assert await harness.log("%an <%ae> %s") == [
        "Bob <bob@example.com> before",
        "Audit Bot <audit-bot@example.com> [SNAPSHOT] live",
        "Audit Bot <audit-bot@example.com> [PRUNE] live",
    ]
    await asyncio.to_thread(assert_all_signed, remote, key, tmp_path, at_least=2)


# -- what does not verify, and what cannot sign ----------------------------------------------------


def test_a_tampered_commit_no_longer_verifies(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote, secret=key.secret())
    log = tmp_path / "audit.log"
    line = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", **event("create", body=configmap())}
    log.write_text(json.dumps(line) + "\n")
    assert run("replay", "--config", str(config), str(log), cwd=tmp_path).returncode == 0
    [commit] = assert_all_signed(remote, key, tmp_path)
    raw = git(remote, "cat-file", "commit", commit)
    forged = raw.replace("User: alice@example.com", "User: mallory@example.com")
    assert forged != raw
    tampered = subprocess.run(
        ["git", "-C", str(remote), "hash-object", "-t", "commit", "-w", "--stdin"],
        input=forged,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    signers = allowed_signers(tmp_path, key)
    verdict = verify_commit(remote, tampered, signers)
    assert verdict.returncode != 0 and "Good" not in verdict.stderr
    payload, signature = split_signature(forged.encode())
    assert not ssh_keygen_verify(tmp_path, payload, signature, signers)
    # The genuine one still does, with the same signature bytes.
    assert verify_commit(remote, commit, signers).returncode == 0
    # A key the allowed-signers file does not list is not trusted either.
    other = make_key(tmp_path, name="other")
    assert verify_commit(remote, commit, allowed_signers(tmp_path, other)).returncode != 0


def check_json(tmp_path: Path, secret: dict[str, str]) -> tuple[int, dict[str, Any]]:
    remote = tmp_path / "remote.git"
    if not remote.exists():
        bare_repo(remote)
    config = write_config(tmp_path / "check.yaml", remote, secret=secret)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(["check", "--config", str(config), "--json"])
    [result] = json.loads(out.getvalue())
    return status, result


def test_check_prints_the_public_key_and_fingerprint_to_register(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = make_key(tmp_path, passphrase="pass phrase")
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote, secret=key.secret())
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    public = " ".join(key.public.split()[:2])  # without the comment
    assert f"  ok    signing: {key.fingerprint} as Audit Bot <audit-bot@example.com>\n" in out
    assert f"        {public}\n" in out and out.endswith("  Ready\n")
    status, result = check_json(tmp_path, key.secret())
    assert (status, result["ready"]) == (0, True)
    assert result["signing"] == {
        "committer": {"name": "Audit Bot", "email": "audit-bot@example.com"},
        "publicKey": public,
        "fingerprint": key.fingerprint,
        "problem": None,
    }


def test_a_signing_key_that_cannot_be_used_makes_the_provider_not_ready(tmp_path: Path) -> None:
    key = make_key(tmp_path, passphrase="right")
    cases = {
        "wrong signingKeyPassphrase": key.secret(signingKeyPassphrase="wrong"),
        "put its passphrase under signingKeyPassphrase": {"signingKey": key.private},
        "not an OpenSSH private key": {"signingKey": "ssh-ed25519 AAAA... (a public key)"},
        "committerName and committerEmail go together": {
            **key.secret(),
            "committerEmail": "",
        },
        "is not a Git identity": key.secret(committerEmail="Audit Bot <bot@example.com>"),
    }
    for problem, secret in cases.items():
        status, result = check_json(tmp_path, secret)
        assert (status, result["ready"], result["reason"]) == (1, False, "SigningKeyInvalid")
        assert "Secret team/git-creds" in result["message"] and problem in result["message"]
        assert "right" not in json.dumps(result) and key.private[40:80] not in json.dumps(result)


def test_serve_and_replay_refuse_to_start_with_an_unusable_signing_key(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    secret = {"signingKey": "not a key"}
    config = write_config(tmp_path / "c.yaml", remote, secret=secret)
    log = tmp_path / "audit.log"
    line = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", **event("create", body=configmap())}
    log.write_text(json.dumps(line) + "\n")
    result = run("replay", "--config", str(config), str(log), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "GitProvider team/origin: Secret team/git-creds: signingKey" in result.stderr
    assert git_files(remote) == []  # nothing unsigned


async def test_in_a_cluster_an_unusable_signing_key_shows_in_the_status_and_commits_nothing(
    tmp_path: Path,
    cluster: Cluster,  # noqa: F811
) -> None:
    _declare_crds(cluster.api)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    provider = {"url": f"file://{remote}", "allowedBranches": ["*"], "secretRef": {"name": "s"}}
    _one_target(cluster, provider, "live")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": "default"},
    }
    cluster.add("v1/secrets", "default", "s", {**secret, "data": {"signingKey": "bm90IGEga2V5"}})
    rules = ClusterRules(cluster.client)
    config = await rules.start()
    settings = Settings(state_dir=tmp_path / "state", rules_from_files=False)
    runtime = await asyncio.to_thread(Runtime, config, settings)
    await runtime.start()
    try:
        await runtime.intake.accept(runtime.intake.triage([event("create", body=configmap())]))
        assert await runtime.flush() == []
        await StatusReporter(cluster.client, rules, runtime.status_state).report()
    finally:
        await runtime.close()
        await rules.close()
    [condition] = cluster.api.objects[f"{CB}/gitproviders", "default", "origin"]["status"][
        "conditions"
    ]
    assert (condition["status"], condition["reason"]) == ("False", "SigningKeyInvalid")
    assert "Secret default/s: signingKey: cannot read the private key" in condition["message"]
    assert runtime.stats.skipped[Skip.TARGET_NOT_READY] == 1
    assert await asyncio.to_thread(git_files, remote) == []


def test_pem_keys_sign_and_weak_or_unusable_keys_are_refused(tmp_path: Path) -> None:
    pem = tmp_path / "pem"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f", str(pem)],
        check=True,
    )
    key = SigningKey.load(pem.read_bytes(), None, source="pem")
    public = pem.with_suffix(".pub").read_text().split()
    assert key.public_key == " ".join(public[:2]) and key.deterministic
    payload = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\nmessage\n"
    (tmp_path / "allowed").write_text(f"someone {key.public_key}\n")
    assert ssh_keygen_verify(tmp_path, payload, key.sign(payload), tmp_path / "allowed", "someone")

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    dsa_key = dsa.generate_private_key(key_size=2048)
    cases = (
        (weak, serialization.PrivateFormat.OpenSSH, "RSA key of 1024 bits"),
        (dsa_key, serialization.PrivateFormat.PKCS8, "DSA keys cannot sign"),
    )
    for unusable, form, why in cases:
        text = unusable.private_bytes(
            serialization.Encoding.PEM, form, serialization.NoEncryption()
        )
        with pytest.raises(ConfigError, match=why):
            SigningKey.load(text, None, source="Secret x: signingKey")


async def test_providers_sharing_a_branch_sign_with_one_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second provider for the same repository branch, with another key and no committer:
    one history, so every commit is signed with the first signing provider's key."""
    key, other = await asyncio.gather(
        asyncio.to_thread(make_key, tmp_path),
        asyncio.to_thread(make_key, tmp_path, name="other"),
    )
    remote = tmp_path / "remote.git"
    second = f"""---
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: second, namespace: team}}
spec:
  url: file://{remote}
  allowedBranches: ["main"]
  secretRef: {{name: second-creds}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: other, namespace: team}}
spec: {{providerRef: {{name: second}}, branch: main, path: other}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: other}}
spec:
  targetRef: {{name: other, namespace: team}}
  rules: [{{scope: Namespaced, resources: ["*"]}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: second-creds, namespace: team}}
stringData: {json.dumps({"signingKey": other.private})}
"""
    harness = await start_harness(tmp_path, secret=key.secret(), documents=second)
    try:
        await harness.send(event("create", body=configmap()))
        await harness.sync()
    finally:
        await harness.runtime.close()
    assert await harness.files() == [
        "live/v1/configmaps/default/demo.yaml",
        "other/v1/configmaps/default/demo.yaml",
    ]
    await asyncio.to_thread(assert_all_signed, remote, key, tmp_path, at_least=2)
    assert "GitProviders team/origin, team/second sign with different keys" in caplog.text
