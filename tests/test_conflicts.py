"""When someone else pushes to our branch: our commits are replayed on top, never forced.

Every assertion reads the remote with the git command line, as a user would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from audit_reverser.errors import MirrorWriteFailed, RemoteUnavailable
from audit_reverser.gitstore.packing import NewObjects
from audit_reverser.gitstore.repository import Mirror
from audit_reverser.gitstore.transport import LocalTransport
from audit_reverser.gitstore.types import FileChange, Identity
from tests.conftest import (
    Harness,
    bare_repo,
    configmap,
    event,
    eventually,
    git,
    git_files,
    git_show,
    git_subjects,
    start_harness,
)
from tests.gitservers import SshServer

OUR_FILE = "live/v1/configmaps/default/a.yaml"
COMMITTER = Identity(name="audit-reverser", email="bot@audit-reverser.invalid")


def _other_tool_commit(remote: Path, work: Path, files: dict[str, str], message: str) -> None:
    """Another writer: change files, commit as Bob, push (plain git, never forced), pulling
    with rebase and trying again when the branch moved under it, as tools do."""
    if not work.exists():
        subprocess.run(["git", "clone", "-q", str(remote), str(work)], check=True)
    run = ["git", "-C", str(work), "-c", "user.name=Bob", "-c", "user.email=bob@example.com"]
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    subprocess.run([*run, "add", "-A"], check=True)
    subprocess.run([*run, "commit", "-q", "-m", message], check=True)
    for _ in range(50):
        if git(remote, "for-each-ref", "refs/heads/main"):
            subprocess.run([*run, "pull", "-q", "--rebase", "origin", "main"], check=True)
        pushed = subprocess.run([*run, "push", "-q", "origin", "HEAD:main"], capture_output=True)
        if pushed.returncode == 0:
            return
    raise AssertionError(pushed.stderr.decode())


def _create(mirror: Mirror, name: str) -> None:
    """Commit ``live/<name>.yaml`` as a new file."""
    mirror.commit(
        FileChange(
            path=f"live/{name}.yaml",
            content=b"x\n",
            message=f"[CREATE] {name}\n",
            author=COMMITTER,
            time=datetime(2026, 3, 1, tzinfo=UTC),
        )
    )


def _protect(remote: Path) -> None:
    """Refuse forced pushes on the server and keep a log of every update of main."""
    git(remote, "config", "receive.denyNonFastForwards", "true")
    git(remote, "config", "core.logAllRefUpdates", "always")


def _only_fast_forwards(remote: Path) -> bool:
    updates = git(remote, "reflog", "show", "--format=%H", "refs/heads/main").split()
    for newer, older in zip(updates, updates[1:], strict=False):
        ancestor = subprocess.run(
            ["git", "-C", str(remote), "merge-base", "--is-ancestor", older, newer]
        )
        if ancestor.returncode != 0:
            return False
    return True


async def _committed(harness: Harness, count: int) -> None:
    [writer] = harness.runtime.writers.values()
    await eventually(lambda: writer.stats.commits >= count)


async def test_our_unpushed_commits_are_replayed_when_the_remote_moved(tmp_path: Path) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    await asyncio.to_thread(_protect, remote)
    harness = await start_harness(tmp_path)
    try:
        await harness.send(event("create", name="a", body=configmap("a", data={"v": "1"})))
        await harness.sync()
        await harness.send(
            event("update", name="a", body=configmap("a", data={"v": "2"}), user="carol"),
            event("create", name="b", body=configmap("b")),
        )
        await _committed(harness, 3)
        mirror = next(iter(harness.runtime.writers.values())).mirror
        before = await asyncio.to_thread(
            git, mirror.path, "log", "-2", "--format=%an|%ae|%ad|%cn|%ce|%cd|%B", "main"
        )
        # Meanwhile someone changes our file and a file of their own, and pushes.
        await asyncio.to_thread(
            _other_tool_commit,
            remote,
            tmp_path / "bob",
            {OUR_FILE: "theirs\n", "docs/README.md": "hello\n"},
            "Bob's change",
        )
        await harness.sync()
    finally:
        await harness.runtime.close()
    subjects = await asyncio.to_thread(git_subjects, remote)
    assert subjects == [
        "[CREATE] v1/configmaps/default/a",
        "Bob's change",
        "[UPDATE] v1/configmaps/default/a",
        "[CREATE] v1/configmaps/default/b",
    ]
    after = await asyncio.to_thread(
        git, remote, "log", "-2", "--format=%an|%ae|%ad|%cn|%ce|%cd|%B", "main"
    )
    assert after == before  # same authors, committers, dates and messages
    assert "v: '2'" in await asyncio.to_thread(git_show, remote, OUR_FILE)  # ours is newer
    assert await asyncio.to_thread(git_show, remote, "docs/README.md") == "hello\n"
    assert await asyncio.to_thread(_only_fast_forwards, remote)
    assert mirror.replays == 1


async def test_a_push_made_alongside_the_commits_replays_onto_a_moved_remote(
    tmp_path: Path,
) -> None:
    """maxCommits 1: each commit is pushed from the writer's second thread while commits go
    on. The remote moved before one of them: that push falls back to the replay, and every
    commit lands on top of the other tool's, never forced."""
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    await asyncio.to_thread(_protect, remote)
    harness = await start_harness(tmp_path, max_commits=1)
    try:
        await harness.send(event("create", name="a", body=configmap("a", data={"v": "1"})))
        await harness.sync()
        await asyncio.to_thread(
            _other_tool_commit, remote, tmp_path / "bob", {"docs/README.md": "hi\n"}, "Bob's"
        )
        await harness.send(
            event("update", name="a", body=configmap("a", data={"v": "2"}), user="carol"),
            event("create", name="b", body=configmap("b")),
        )
        async with asyncio.timeout(30):  # no flush: the writer pushes by itself
            while len(await harness.subjects()) < 4:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.05)
        [writer] = harness.runtime.writers.values()
    finally:
        await harness.runtime.close()
    assert await harness.subjects() == [
        "[CREATE] v1/configmaps/default/a",
        "Bob's",
        "[UPDATE] v1/configmaps/default/a",
        "[CREATE] v1/configmaps/default/b",
    ]
    assert await asyncio.to_thread(_only_fast_forwards, remote)
    assert writer.mirror.replays == 1
    assert writer.stats.push_failures == 0  # replayed at once, not after a back-off
    assert await asyncio.to_thread(git, remote, "fsck", "--strict", "--no-dangling") == ""


async def test_a_concurrent_writer_and_an_outage_lose_nothing_and_force_nothing(
    tmp_path: Path, sshd: SshServer
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    await asyncio.to_thread(_protect, remote)
    secret = {"ssh-privatekey": sshd.client_key.private, "known_hosts": sshd.known_hosts}
    harness = await start_harness(
        tmp_path, url=sshd.url(remote), secret=secret, max_commits=3, interval="100ms"
    )
    [writer] = harness.runtime.writers.values()

    # Another tool pushes its own files to the same branch every few milliseconds.
    stop = threading.Event()
    theirs: list[str] = []

    def other_tool() -> None:
        while not stop.is_set():
            n = len(theirs)
            _other_tool_commit(remote, tmp_path / "bob", {f"other/{n}.txt": f"{n}\n"}, f"other {n}")
            theirs.append(f"other {n}")
            stop.wait(0.03)

    other = threading.Thread(target=other_tool)
    other.start()
    ours = []
    try:
        for round_ in range(6):
            if round_ == 2:
                await asyncio.to_thread(sshd.stop)  # the remote goes away...
            if round_ == 4:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(sshd.start)  # ...and comes back
            for i in range(8):
                name = f"cm-{round_}-{i}"
                await harness.send(event("create", name=name, body=configmap(name)))
                ours.append(f"[CREATE] v1/configmaps/default/{name}")
            await asyncio.sleep(0.15)
        stop.set()
        await asyncio.to_thread(other.join)
        assert await harness.runtime.flush() == []
    finally:
        stop.set()
        await harness.runtime.close()

    subjects = await asyncio.to_thread(git_subjects, remote)
    assert [s for s in subjects if s.startswith("[CREATE]")] == ours  # each once, in order
    assert [s for s in subjects if s.startswith("other")] == theirs  # nothing of theirs lost
    files = await asyncio.to_thread(git_files, remote)
    assert len([f for f in files if f.startswith("live/")]) == len(ours)
    assert await asyncio.to_thread(_only_fast_forwards, remote)
    assert writer.stats.push_failures >= 1 and writer.mirror.replays >= 1


class _DiskFullOnce:
    """The mirror's pack writing fails once, as with a full disk, then works again."""

    def __init__(self, objects: NewObjects) -> None:
        self.write_pack = objects.write_pack
        self.failed = False

    def __call__(self, pack_dir: Path) -> Path | None:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.write_pack(pack_dir)


def _change(n: int, content: str, *, audit_ids: tuple[str, ...] = ()) -> FileChange:
    trailers = "".join(f"Audit-ID: {audit_id}\n" for audit_id in audit_ids)
    return FileChange(
        path=f"live/c{n}.yaml",
        content=content.encode(),
        message=f"[CREATE] c{n}\n\n{trailers}" if trailers else f"Resync c{n}\n",
        author=COMMITTER,
        time=datetime(2026, 3, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize("restarted", [False, True], ids=["push", "next-start"])
def test_a_replay_leaves_out_the_changes_another_writer_pushed_for_the_same_requests(
    tmp_path: Path, restarted: bool
) -> None:
    """HA: a writer past its lease pushes what its successor committed again. The successor's
    replay leaves those commits out (each request's change once in the history), and replays
    the rest: a request the other writer did not record, and changes that name none."""
    remote = bare_repo(tmp_path / "remote.git")
    _protect(remote)
    _other_tool_commit(remote, tmp_path / "bob", {"docs/README.md": "v1\n"}, "Bob 1")
    old, new = (
        Mirror(tmp_path / f"{name}.git", LocalTransport(remote), "main", COMMITTER)
        for name in ("old", "new")
    )
    for mirror in (old, new):
        mirror.open()
        mirror.sync()
    # The same events: a Secret encrypted again is other bytes; c2's commit also records id-3.
    for mirror, secret in ((old, "sops: 1\n"), (new, "sops: 2\n")):
        mirror.commit(_change(1, secret, audit_ids=("id-1",)))
        mirror.commit(_change(5, "resync\n"))  # names no request: replayed
    old.commit(_change(2, "v2\n", audit_ids=("id-2",)))
    new.commit(_change(2, "v3\n", audit_ids=("id-2", "id-3")))  # also id-3: not all there
    new.commit(_change(4, "x\n", audit_ids=("id-4",)))
    assert old.push() == 3
    if restarted:  # our commits were saved before a restart; the start's sync replays them
        new.save()
        new = Mirror(tmp_path / "new.git", LocalTransport(remote), "main", COMMITTER)
        new.open()
        new.sync()
        assert new.unpushed == 3
        assert new.push() == 3
    else:
        assert new.push() == 4  # 3 replayed, 1 left out
    log = git(
        remote,
        "log",
        "--reverse",
        "--format=%s|%(trailers:key=Audit-ID,valueonly,separator=%x2C)",
        "main",
    )
    assert log.splitlines() == [
        "Bob 1|",
        "[CREATE] c1|id-1",
        "Resync c5|",
        "[CREATE] c2|id-2",
        "Resync c5|",
        "[CREATE] c2|id-2,id-3",
        "[CREATE] c4|id-4",
    ]
    assert git_show(remote, "live/c1.yaml") == "sops: 1\n"  # the change pushed first
    assert git_show(remote, "live/c2.yaml") == "v3\n"
    assert _only_fast_forwards(remote)
    assert subprocess.run(["git", "-C", str(remote), "fsck", "--strict"]).returncode == 0


def test_a_replay_that_cannot_be_saved_keeps_our_commits(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    _other_tool_commit(remote, tmp_path / "bob", {"docs/README.md": "v1\n"}, "Bob 1")
    mirror = Mirror(tmp_path / "mirror.git", LocalTransport(remote), "main", COMMITTER)
    mirror.open()
    mirror.sync()
    when = datetime(2026, 3, 1, tzinfo=UTC)
    for name in ("a", "b"):
        change = FileChange(
            path=f"live/{name}.yaml",
            content=b"x\n",
            message=f"[CREATE] {name}\n",
            author=COMMITTER,
            time=when,
        )
        mirror.commit(change)
    mirror.save()
    _other_tool_commit(remote, tmp_path / "bob", {"docs/README.md": "v2\n"}, "Bob 2")
    mirror._objects.write_pack = _DiskFullOnce(mirror._objects)  # type: ignore[method-assign]
    with pytest.raises(MirrorWriteFailed):
        mirror.push()
    assert mirror.unpushed == 2
    assert mirror.push() == 2
    assert git_subjects(remote) == ["Bob 1", "Bob 2", "[CREATE] a", "[CREATE] b"]


@pytest.mark.parametrize("restarted", [False, True], ids=["running", "after-restart"])
def test_a_lock_left_in_the_remote_by_a_killed_push_does_not_stop_pushing(
    tmp_path: Path, restarted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer killed while it held the remote branch's lock leaves ``main.lock`` behind
    (git's own commands then fail on that branch until it is removed by hand). A fresh lock
    is someone's update under way: our commits wait. One older than any update takes is
    removed, and the commits go out."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = Mirror(tmp_path / "mirror.git", LocalTransport(remote), "main", COMMITTER)
    mirror.open()
    mirror.sync()

    _create(mirror, "a")
    assert mirror.push() == 1
    lock = remote / "refs" / "heads" / "main.lock"
    lock.write_bytes(b"")  # an update under way, or one killed a moment ago
    _create(mirror, "b")
    with pytest.raises(RemoteUnavailable):
        mirror.push()
    assert mirror.unpushed == 1 and lock.exists()
    if restarted:  # a new process: what is outgoing is worked out from the refs (libgit2)
        mirror.save()
        mirror = Mirror(tmp_path / "mirror.git", LocalTransport(remote), "main", COMMITTER)
        mirror.open()
    long_ago = lock.stat().st_mtime - 60
    os.utime(lock, (long_ago, long_ago))
    with caplog.at_level(logging.WARNING):
        assert mirror.push() == 1
    assert not lock.exists()
    assert git_subjects(remote) == ["[CREATE] a", "[CREATE] b"]
    assert "removed refs/heads/main.lock, left 60s ago" in caplog.text
    subprocess.run(["git", "-C", str(remote), "fsck", "--strict"], check=True)


def test_a_lock_naming_our_own_commit_is_removed_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kill -9 while our push's ref update held the remote's lock leaves ``main.lock``
    holding the commit it was writing, one of the mirror's own: the restarted writer removes
    it at once (a stop right after the restart pushes everything) instead of waiting for it
    to age. A fresh lock naming any other commit is someone's update under way: we wait,
    also when it names a commit the remote already had (someone resetting the branch)."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = Mirror(tmp_path / "mirror.git", LocalTransport(remote), "main", COMMITTER)
    mirror.open()
    mirror.sync()
    lock = remote / "refs" / "heads" / "main.lock"
    _create(mirror, "a")
    assert mirror.push() == 1
    pushed = mirror.tip
    _create(mirror, "b")
    mirror.save()
    assert mirror.tip is not None and pushed is not None
    for someone_elses in ("5" * 40, pushed):  # no commit of ours; one the remote has
        lock.write_text(someone_elses + "\n")
        with pytest.raises(RemoteUnavailable):
            mirror.push()
        assert lock.read_text() == someone_elses + "\n"
    lock.write_text(mirror.tip + "\n")  # what our killed update had written
    mirror = Mirror(tmp_path / "mirror.git", LocalTransport(remote), "main", COMMITTER)
    mirror.open()
    with caplog.at_level(logging.WARNING):
        assert mirror.push() == 1
    assert not lock.exists()
    assert git_subjects(remote) == ["[CREATE] a", "[CREATE] b"]
    assert "removed refs/heads/main.lock" in caplog.text


def test_a_lock_left_in_the_mirror_by_a_killed_save_does_not_stop_the_next_run(
    tmp_path: Path,
) -> None:
    """A kill -9 while a save held the mirror's branch lock: the next run (the only user
    of its state directory) removes it, and its commits go on the branch and out."""
    remote = bare_repo(tmp_path / "remote.git")

    def run(name: str) -> Mirror:
        mirror = Mirror(tmp_path / "mirror.git", LocalTransport(remote), "main", COMMITTER)
        mirror.open()
        mirror.sync()
        _create(mirror, name)
        mirror.save()
        return mirror

    first = run("a")
    assert first.tip is not None
    (tmp_path / "mirror.git" / "refs" / "heads" / "main.lock").write_text(first.tip + "\n")
    second = run("b")
    assert second.push() == 2
    assert git_subjects(remote) == ["[CREATE] a", "[CREATE] b"]
