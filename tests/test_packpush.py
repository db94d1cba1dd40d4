"""Pushing to SSH remotes by sending our own packs through git-receive-pack (real sshd, real
bare repositories read back with plain git): same history as libgit2's push, a moved remote
replayed onto, refusals that name the reason, and libgit2 where this path does not fit."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import threading
from pathlib import Path

import pytest

from audit_reverser.errors import RemoteUnavailable
from audit_reverser.gitstore import packpush
from audit_reverser.gitstore.transport import NetworkTransport
from tests.conftest import Harness, bare_repo, configmap, event, git, start_harness
from tests.gitservers import GitHttpServer, KeyPair, SshServer

FALLBACK = "pushing with libgit2"


def _secret(server: SshServer, **overrides: str) -> dict[str, str]:
    return {
        "ssh-privatekey": server.client_key.private,
        "known_hosts": server.known_hosts,
        **overrides,
    }


def _remote(path: Path) -> Path:
    """A bare repository that keeps every pack it receives as it came (no loose objects)."""
    bare_repo(path)
    git(path, "config", "receive.unpackLimit", "1")
    return path


async def _send(harness: Harness, *names: str) -> list[str]:
    """One event per name, then a push; the failures runtime.flush reports."""
    for name in names:
        await harness.send(
            event("create", name=name, body=configmap(name), user="jane@example.com")
        )
    return await harness.runtime.flush()


def _packs(folder: Path) -> set[str]:
    return {pack.name for pack in folder.glob("**/objects/pack/pack-*.pack")}


async def _two_pushes_carry_our_packs(
    harness: Harness, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two events, a push, one more, a push; then the runtime is closed. The remote holds
    the very packs the mirror wrote (not ones rebuilt for the push), and git finds it whole."""
    try:
        assert await _send(harness, "a", "b") == []
        assert await _send(harness, "c") == []
    finally:
        await harness.runtime.close()
    assert FALLBACK not in caplog.text
    remote_packs = await asyncio.to_thread(_packs, harness.remote)
    assert len(remote_packs) == 2
    assert remote_packs <= await asyncio.to_thread(_packs, state)
    assert await asyncio.to_thread(git, harness.remote, "fsck", "--strict", "--no-dangling") == ""


async def test_pushes_send_our_packs_and_land_the_same_history_as_libgit2(
    tmp_path: Path, sshd: SshServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    remote = await asyncio.to_thread(_remote, tmp_path / "ours" / "remote.git")
    harness = await start_harness(tmp_path / "ours", url=sshd.url(remote), secret=_secret(sshd))
    await _two_pushes_carry_our_packs(harness, tmp_path / "ours" / "state", caplog)

    # The same events through libgit2's push (an encrypted key falls back to it).
    key = await asyncio.to_thread(KeyPair, "correct horse")
    await asyncio.to_thread(sshd.authorize, key.public)
    other = await asyncio.to_thread(_remote, tmp_path / "theirs" / "remote.git")
    secret = _secret(sshd, **{"ssh-privatekey": key.private, "passphrase": "correct horse"})
    harness = await start_harness(tmp_path / "theirs", url=sshd.url(other), secret=secret)
    try:
        assert await _send(harness, "a", "b") == []
        assert await _send(harness, "c") == []
    finally:
        await harness.runtime.close()
    assert caplog.text.count(f"{FALLBACK}: the deploy key is encrypted") == 1
    assert not await asyncio.to_thread(
        lambda: _packs(other) & _packs(tmp_path / "theirs" / "state")
    )
    # Byte for byte the commits we made (the tip's id covers the whole history), and the
    # same trees, authors and messages as libgit2's push landed.
    for repo, folder in ((remote, "ours"), (other, "theirs")):
        [mirror] = await asyncio.to_thread(
            lambda folder=folder: list((tmp_path / folder / "state").glob("**/refs/heads/main"))
        )
        tip = await asyncio.to_thread(mirror.read_text)
        assert tip == await asyncio.to_thread(git, repo, "rev-parse", "main")
    fmt = "--format=%T %an <%ae> %ad %s"
    history = [await asyncio.to_thread(git, repo, "log", fmt, "main") for repo in (remote, other)]
    assert history[0] == history[1]
    assert len(history[0].splitlines()) == 3


async def test_a_moved_remote_gets_our_commits_replayed_on_top(
    tmp_path: Path, sshd: SshServer
) -> None:
    remote = await asyncio.to_thread(_remote, tmp_path / "remote.git")
    harness = await start_harness(tmp_path, url=sshd.url(remote), secret=_secret(sshd))
    try:
        assert await _send(harness, "first") == []
        # Someone else pushes a commit of their own.
        clone = tmp_path / "clone"
        await asyncio.to_thread(git, tmp_path, "clone", "-q", str(remote), str(clone))
        await asyncio.to_thread((clone / "README.md").write_text, "hello\n")
        await asyncio.to_thread(git, clone, "add", "README.md")
        await asyncio.to_thread(
            git,
            clone,
            "-c",
            "user.name=Bob",
            "-c",
            "user.email=bob@example.com",
            "commit",
            "-q",
            "-m",
            "theirs",
        )
        await asyncio.to_thread(git, clone, "push", "-q", "origin", "main")
        theirs = (await asyncio.to_thread(git, clone, "rev-parse", "HEAD")).strip()
        assert await _send(harness, "second") == []
    finally:
        await harness.runtime.close()
    subjects = await harness.subjects()
    assert subjects[1] == "theirs" and len(subjects) == 3
    # Not forced: their commit is still in the branch, ours on top of it.
    await asyncio.to_thread(git, remote, "merge-base", "--is-ancestor", theirs, "main")
    assert await harness.files() == [
        "README.md",
        "live/v1/configmaps/default/first.yaml",
        "live/v1/configmaps/default/second.yaml",
    ]
    assert await asyncio.to_thread(git, remote, "fsck", "--strict", "--no-dangling") == ""


async def test_a_refused_update_keeps_the_commits_for_the_next_push(
    tmp_path: Path, sshd: SshServer
) -> None:
    remote = await asyncio.to_thread(_remote, tmp_path / "remote.git")
    hook = remote / "hooks" / "pre-receive"
    await asyncio.to_thread(hook.write_text, "#!/bin/sh\necho 'frozen' >&2\nexit 1\n")
    await asyncio.to_thread(hook.chmod, 0o755)
    harness = await start_harness(tmp_path, url=sshd.url(remote), secret=_secret(sshd))
    try:
        [failure] = await _send(harness, "demo")
        assert "was rejected: refs/heads/main: pre-receive hook declined" in failure
        assert "1 commits kept" in failure
        assert await harness.files() == []
        await asyncio.to_thread(hook.unlink)
        assert await harness.runtime.flush() == []
    finally:
        await harness.runtime.close()
    assert await harness.files() == ["live/v1/configmaps/default/demo.yaml"]


@pytest.mark.parametrize("wrong", ["host key", "deploy key"])
async def test_an_unknown_host_or_key_is_refused_without_showing_the_key(
    tmp_path: Path, sshd: SshServer, wrong: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    remote = await asyncio.to_thread(_remote, tmp_path / "remote.git")
    stranger = KeyPair()
    if wrong == "host key":
        secret = _secret(sshd, known_hosts=f"[127.0.0.1]:{sshd.port} {stranger.public}\n")
        reason = "host key of 127.0.0.1 is not trusted: it is missing from, or differs from, "
    else:
        secret = _secret(sshd, **{"ssh-privatekey": stranger.private})
        reason = "authentication failed (Secret team/git-creds)"
    harness = await start_harness(tmp_path, url=sshd.url(remote), secret=secret)
    try:
        [failure] = await _send(harness, "demo")
    finally:
        await harness.runtime.close()
    assert reason in failure and "1 commits kept" in failure
    assert FALLBACK not in caplog.text
    assert await harness.files() == []
    for line in secret["ssh-privatekey"].splitlines()[1:-1]:
        assert line not in caplog.text and line not in failure


def _only_git(folder: Path) -> str:
    """A PATH with git in it and no ssh."""
    folder.mkdir()
    program = shutil.which("git")
    assert program is not None
    (folder / "git").symlink_to(program)
    return str(folder)


async def test_without_an_ssh_program_libgit2_pushes(
    tmp_path: Path,
    sshd: SshServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("PATH", await asyncio.to_thread(_only_git, tmp_path / "bin"))
    remote = await asyncio.to_thread(_remote, tmp_path / "remote.git")
    harness = await start_harness(tmp_path, url=sshd.url(remote), secret=_secret(sshd))
    try:
        assert await _send(harness, "a") == []
        assert await _send(harness, "b") == []
    finally:
        await harness.runtime.close()
    assert caplog.text.count(f"{FALLBACK}: no ssh program") == 1
    assert await harness.subjects() and len(await harness.subjects()) == 2
    assert await asyncio.to_thread(git, remote, "fsck", "--strict", "--no-dangling") == ""


async def test_https_pushes_send_our_packs_too(
    tmp_path: Path, git_http: GitHttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    remote = await asyncio.to_thread(_remote, tmp_path / "remote.git")
    secret = {"username": "bot", "password": "s3cr3t-t0ken-9f8e7d"}
    harness = await start_harness(tmp_path, url=git_http.url(remote), secret=secret)
    await _two_pushes_carry_our_packs(harness, tmp_path / "state", caplog)
    assert len(await harness.subjects()) == 3
    # Credentials only where they were asked for: each push's first request is anonymous.
    # (The first two: the fetch on start; info/refs?service=git-receive-pack after.)
    push = [
        "GET /remote.git/info/refs -",
        "GET /remote.git/info/refs bot",
        "POST /remote.git/git-receive-pack bot",
    ]
    assert git_http.requests[2:] == push * 2
    assert "s3cr3t-t0ken-9f8e7d" not in caplog.text


async def test_commits_go_on_while_the_server_takes_its_time_with_a_push(
    tmp_path: Path, git_http: GitHttpServer
) -> None:
    """A push waiting on a slow server does not hold the next events back: they are
    committed in the mirror meanwhile, and once the server answers every commit reaches the
    remote, in order, in as many pushes as it took."""
    remote = await asyncio.to_thread(_remote, tmp_path / "remote.git")
    secret = {"username": "bot", "password": "s3cr3t-t0ken-9f8e7d"}
    harness = await start_harness(tmp_path, url=git_http.url(remote), secret=secret, max_commits=2)
    [writer] = harness.runtime.writers.values()

    async def committed() -> int:
        count = await asyncio.to_thread(git, writer.mirror.path, "rev-list", "--count", "--all")
        return int(count)

    async def until_committed(count: int) -> None:
        for _ in range(600):
            if await committed() >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{await committed()} commits in the mirror, not {count}")

    try:
        assert await _send(harness, "first") == []  # fetched and pushed once
        git_http.answering.clear()  # the server sits on every request from now on
        for name in ("a", "b"):  # two commits: maxCommits, so a push starts and waits
            await harness.send(event("create", name=name, body=configmap(name), user="ana"))
        await until_committed(3)
        for name in ("c", "d"):
            await harness.send(event("create", name=name, body=configmap(name), user="bob"))
        await until_committed(5)
        assert len(await harness.subjects()) == 1  # the push is still held
        git_http.answering.set()
        await harness.sync()
    finally:
        git_http.answering.set()
        await harness.runtime.close()
    names = [subject.split("/")[-1] for subject in await harness.subjects()]
    assert names == ["first", "a", "b", "c", "d"]
    assert await asyncio.to_thread(git, remote, "fsck", "--strict", "--no-dangling") == ""


def test_an_https_server_that_never_takes_the_connection_fails_the_push_at_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server whose listen queue is full never completes the TCP handshake: the push
    gives up after CONNECT_TIMEOUT_S (15 s; here shortened), not after SERVER_TIMEOUT_S
    (120 s, for the answers; here an hour, which the test would not outlive)."""
    monkeypatch.setattr(packpush, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(packpush, "SERVER_TIMEOUT_S", 3600)
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
        port = server.getsockname()[1]
        waiting = []
        for _ in range(4):  # fill the accept queue: later handshakes go unanswered
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            waiting.append(client)
        transport = NetworkTransport(f"http://127.0.0.1:{port}/remote.git", None)
        failures: list[BaseException] = []

        def push() -> None:
            try:
                packpush._push_http(transport, "refs/heads/main", None, b"\1" * 20, Path("x"))
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                failures.append(exc)

        pushing = threading.Thread(target=push, daemon=True)
        pushing.start()
        pushing.join(timeout=60)  # a push that waits for the hour fails here, not hangs CI
        for client in waiting:
            client.close()
    assert not pushing.is_alive(), "the push waited past the connect timeout"
    assert len(failures) == 1 and isinstance(failures[0], RemoteUnavailable), failures
    assert "timed out" in str(failures[0])
