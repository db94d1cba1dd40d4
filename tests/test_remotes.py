"""Pushing to real servers: OpenSSH with a deploy key and known_hosts, git http-backend with
basic auth; refusals that name the reason and never show a credential."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from audit_reverser.cli import main
from audit_reverser.errors import ConfigError
from tests.conftest import (
    Harness,
    bare_repo,
    configmap,
    event,
    event_list,
    git_files,
    git_subjects,
    request,
    start_harness,
    start_serve,
    write_config,
)
from tests.gitservers import GitHttpServer, KeyPair, SshServer, free_port
from tests.pki import Authority


async def _harness(directory: Path, url: str, secret: dict[str, str] | None) -> Harness:
    """A pipeline in ``directory`` whose provider points at ``url`` (its repo already made)."""
    return await start_harness(directory, url=url, secret=secret)


async def _push_one(harness: Harness, name: str = "demo") -> list[str]:
    """Send one change and push; the failures runtime.flush reports."""
    await harness.send(event("create", name=name, body=configmap(name), user="jane@example.com"))
    return await harness.runtime.flush()


def _ssh_secret(server: SshServer, **overrides: str) -> dict[str, str]:
    return {
        "ssh-privatekey": server.client_key.private,
        "known_hosts": server.known_hosts,
        **overrides,
    }


# -- SSH ------------------------------------------------------------------------------------


async def test_commits_reach_an_ssh_remote_with_a_deploy_key(
    tmp_path: Path, sshd: SshServer
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    harness = await _harness(tmp_path, sshd.url(remote), _ssh_secret(sshd))
    try:
        assert await _push_one(harness) == []
        assert await harness.files() == ["live/v1/configmaps/default/demo.yaml"]
        assert await harness.log("%an <%ae>") == ["jane@example.com <jane@example.com>"]
        # A second run reuses the mirror and builds on what the remote holds.
        await harness.runtime.close()
        harness = await _harness(tmp_path, sshd.url(remote), _ssh_secret(sshd))
        assert await _push_one(harness, "second") == []
        assert len(await harness.subjects()) == 2
    finally:
        await harness.runtime.close()


@pytest.mark.parametrize("passphrase", ["correct horse", "wrong horse"])
async def test_a_key_with_a_passphrase(tmp_path: Path, sshd: SshServer, passphrase: str) -> None:
    key = await asyncio.to_thread(KeyPair, "correct horse")
    await asyncio.to_thread(sshd.authorize, key.public)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    secret = _ssh_secret(sshd, **{"ssh-privatekey": key.private, "passphrase": passphrase})
    harness = await _harness(tmp_path, sshd.url(remote), secret)
    try:
        failures = await _push_one(harness)
    finally:
        await harness.runtime.close()
    if passphrase == "correct horse":
        assert failures == []
        assert await asyncio.to_thread(git_files, remote) == [
            "live/v1/configmaps/default/demo.yaml"
        ]
    else:
        [failure] = failures
        assert "cannot use the private key in Secret team/git-creds: wrong passphrase" in failure
        assert passphrase not in failure


@pytest.mark.parametrize("wrong", ["other key for this host", "this key for another host"])
async def test_an_unknown_or_changed_host_key_is_refused(
    tmp_path: Path, sshd: SshServer, wrong: str, caplog: pytest.LogCaptureFixture
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    if wrong == "other key for this host":
        known_hosts = f"[127.0.0.1]:{sshd.port} {KeyPair().public}\n"
    else:
        known_hosts = f"[127.0.0.1]:{sshd.port + 1} {sshd.host_key.public}\n"
    secret = _ssh_secret(sshd, known_hosts=known_hosts)
    harness = await _harness(tmp_path, sshd.url(remote), secret)
    try:
        [failure] = await _push_one(harness)
        assert "host key of 127.0.0.1 is not trusted" in failure
        assert "known_hosts in Secret team/git-creds" in failure
        assert await asyncio.to_thread(git_files, remote) == []
        # The change is kept: trusting the host (a corrected Secret) pushes it.
    finally:
        await harness.runtime.close()
    assert sshd.client_key.private.splitlines()[1] not in caplog.text
    harness = await _harness(tmp_path, sshd.url(remote), _ssh_secret(sshd))
    try:
        assert await harness.runtime.flush() == []
        assert await harness.files() == ["live/v1/configmaps/default/demo.yaml"]
    finally:
        await harness.runtime.close()


async def test_a_key_the_server_does_not_know_fails_with_a_clear_reason(
    tmp_path: Path, sshd: SshServer, caplog: pytest.LogCaptureFixture
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    stranger = KeyPair()
    secret = _ssh_secret(sshd, **{"ssh-privatekey": stranger.private})
    harness = await _harness(tmp_path, sshd.url(remote), secret)
    try:
        [failure] = await _push_one(harness)
    finally:
        await harness.runtime.close()
    assert "authentication failed (Secret team/git-creds)" in failure
    for line in stranger.private.splitlines()[1:-1]:
        assert line not in caplog.text and line not in failure


async def test_ssh_without_known_hosts_is_a_config_error(tmp_path: Path, sshd: SshServer) -> None:
    secret = {"ssh-privatekey": sshd.client_key.private}
    with pytest.raises(ConfigError, match="has no known_hosts; host keys are always verified"):
        await _harness(tmp_path, sshd.url(tmp_path / "r.git"), secret)
    with pytest.raises(ConfigError, match="SSH needs a deploy key"):
        await _harness(tmp_path, sshd.url(tmp_path / "r.git"), {"known_hosts": sshd.known_hosts})


# -- HTTPS (git http-backend, plain HTTP on loopback) ----------------------------------------


@pytest.mark.parametrize(
    "credentials",
    [
        {"secret": {"username": "bot", "password": "s3cr3t-t0ken-9f8e7d"}},
        {"secret": {"token": "s3cr3t-t0ken-9f8e7d"}, "any_user": True},
        {"in_url": "bot:s3cr3t-t0ken-9f8e7d@"},
    ],
    ids=["username-password", "token", "in-url"],
)
async def test_commits_reach_an_http_remote_with_credentials(
    tmp_path: Path,
    git_http: GitHttpServer,
    credentials: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    if credentials.get("any_user"):
        git_http.username = None
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    url = git_http.url(remote)
    if "in_url" in credentials:
        url = url.replace("http://", f"http://{credentials['in_url']}")
    harness = await _harness(tmp_path, url, credentials.get("secret"))
    try:
        assert await _push_one(harness) == []
        assert await harness.files() == ["live/v1/configmaps/default/demo.yaml"]
        assert await harness.log("%an") == ["jane@example.com"]
    finally:
        await harness.runtime.close()
    pushes = [r for r in git_http.requests if r.startswith("POST /remote.git/git-receive-pack")]
    assert pushes and all(not push.endswith(" -") for push in pushes)
    assert "s3cr3t-t0ken-9f8e7d" not in caplog.text


async def test_a_wrong_password_is_refused_once_and_never_shown(
    tmp_path: Path, git_http: GitHttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    secret = {"username": "bot", "password": "wrong-password-1234"}
    harness = await _harness(tmp_path, git_http.url(remote), secret)
    try:
        [failure] = await _push_one(harness)
        # The fetch on start, the push, the fetch to see whether the remote moved: two
        # requests each (the anonymous probe, one answer to the 401); libgit2 alone would
        # ask again and again.
        assert len(git_http.requests) == 6
    finally:
        await harness.runtime.close()
    assert "authentication failed (Secret team/git-creds)" in failure
    assert "wrong-password-1234" not in caplog.text + failure
    assert await asyncio.to_thread(git_files, remote) == []


# -- audit-reverser check -------------------------------------------------------------------


def _check(tmp_path: Path, url: str, secret: dict[str, str] | None) -> tuple[int, dict[str, Any]]:
    config = write_config(tmp_path / "check.yaml", tmp_path / "unused.git", url=url, secret=secret)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(["check", "--config", str(config), "--json"])
    [result] = json.loads(out.getvalue())
    return status, result


def test_check_reports_a_pushable_ssh_remote_as_ready(tmp_path: Path, sshd: SshServer) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    status, result = _check(tmp_path, sshd.url(remote), _ssh_secret(sshd))
    assert (status, result["ready"], result["reason"]) == (0, True, "Ready")
    assert [c["name"] for c in result["checks"]] == ["reachable", "authenticated", "branch", "push"]
    assert "main is new" in result["checks"][2]["detail"]
    assert git_files(remote) == []  # checking pushes nothing


def test_check_names_why_a_remote_is_not_ready(
    tmp_path: Path, sshd: SshServer, git_http: GitHttpServer
) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    read_only = KeyPair()
    sshd.authorize(read_only.public, read_only=True)
    cases = {
        "HostKeyNotTrusted": (
            sshd.url(remote),
            _ssh_secret(sshd, known_hosts=f"[127.0.0.1]:{sshd.port} {KeyPair().public}"),
        ),
        "AuthenticationFailed": (
            sshd.url(remote),
            _ssh_secret(sshd, **{"ssh-privatekey": KeyPair().private}),
        ),
        "PushDenied": (
            sshd.url(remote),
            _ssh_secret(sshd, **{"ssh-privatekey": read_only.private}),
        ),
        "Unreachable": (f"ssh://git@127.0.0.1:{free_port()}/r.git", _ssh_secret(sshd)),
    }
    for reason, (url, secret) in cases.items():
        status, result = _check(tmp_path, url, secret)
        assert (status, result["reason"]) == (1, reason), result
    status, result = _check(tmp_path, git_http.url(remote), {"password": "nope-nope"})
    assert (status, result["reason"]) == (1, "AuthenticationFailed")
    assert "nope-nope" not in json.dumps(result)


def test_check_prints_a_readable_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    assert main(["check", "--config", str(write_config(tmp_path / "c.yaml", remote))]) == 0
    out = capsys.readouterr().out
    assert f"GitProvider team/origin: {remote} branch main" in out
    assert "ok    push: objects and refs are writable" in out and out.endswith("  Ready\n")


async def test_https_with_a_private_authority_needs_its_ca_in_the_secret(tmp_path: Path) -> None:
    authority = await asyncio.to_thread(Authority, tmp_path, "private-ca")
    issued = await asyncio.to_thread(authority.issue, "127.0.0.1", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    await asyncio.to_thread(context.load_cert_chain, issued.cert, issued.key)
    server = GitHttpServer(tmp_path, username="bot", password="pw-1234", tls=context)
    await asyncio.to_thread(server.start)
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    secret = {"username": "bot", "password": "pw-1234"}
    try:
        harness = await _harness(tmp_path / "untrusted", server.url(remote), secret)
        try:
            [failure] = await _push_one(harness)
        finally:
            await harness.runtime.close()
        assert "certificate of 127.0.0.1 is not trusted" in failure
        assert "ca.crt in Secret team/git-creds" in failure

        ca_pem = await asyncio.to_thread(authority.cert.read_text)
        harness = await _harness(
            tmp_path / "trusted", server.url(remote), {**secret, "ca.crt": ca_pem}
        )
        try:
            assert await _push_one(harness) == []
        finally:
            await harness.runtime.close()
    finally:
        await asyncio.to_thread(server.stop)
    assert await asyncio.to_thread(git_files, remote) == ["live/v1/configmaps/default/demo.yaml"]


class _SilentServer:
    """Takes connections and never answers, like a host behind a broken proxy."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.connections.append(self.socket.accept()[0])


def test_a_silent_remote_delays_neither_start_nor_shutdown(tmp_path: Path) -> None:
    """libgit2 waits up to two minutes for a silent server; the receiver starts at once and
    SIGTERM ends it within --shutdown-timeout, the change kept in the journal."""
    silent = _SilentServer()
    url = f"http://127.0.0.1:{silent.port}/repo.git"
    config = write_config(tmp_path / "c.yaml", tmp_path / "unused.git", url=url)
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    served = start_serve(tmp_path, *state, "--shutdown-timeout", "2")
    body = json.dumps(event_list(event("create", body=configmap()))).encode()
    status, _ = request(
        served.port, "POST", "/audit-webhook", body, headers={"Content-Type": "application/json"}
    )
    assert status == 200
    served.process.terminate()
    served.process.wait(timeout=60)  # half of libgit2's own time-out: it must not be waited for
    log = served.log.read_text()
    assert "1 events stay in the journal and 0 commits in the mirrors" in log
    assert silent.connections  # it did try


def test_a_stop_pushes_once_the_remote_takes_the_push_again(tmp_path: Path) -> None:
    """SIGTERM while the remote's branch is locked by an update someone else has under way:
    serve tries the push again, and exits once the commit is in the remote (within
    --shutdown-timeout), not leaving it in the mirror for a next start."""
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    served = start_serve(tmp_path, *state, "--shutdown-timeout", "60")
    lock = remote / "refs" / "heads" / "main.lock"
    lock.write_text("1" * 40 + "\n")  # fresh, naming no commit of ours: it must wait
    body = json.dumps(event_list(event("create", body=configmap()))).encode()
    status, _ = request(
        served.port, "POST", "/audit-webhook", body, headers={"Content-Type": "application/json"}
    )
    assert status == 200
    served.process.terminate()
    deadline = time.monotonic() + 30
    while "commits not pushed yet, next try in" not in served.log.read_text():
        assert served.process.poll() is None, served.log.read_text()
        assert time.monotonic() < deadline, served.log.read_text()
        time.sleep(0.05)
    lock.unlink()
    assert served.process.wait(timeout=60) == 0, served.log.read_text()
    assert git_subjects(remote) == ["[CREATE] v1/configmaps/default/demo"]
