"""The branch writer: pushes by maxCommits and interval, keeps commits while the remote is away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from audit_reverser.config import load_config
from audit_reverser.gitstore import writer as writer_module
from audit_reverser.gitstore.writer import BranchWriter
from audit_reverser.runtime import Runtime, Settings
from tests.conftest import (
    Harness,
    bare_repo,
    configmap,
    event,
    eventually,
    file_change,
    git_subjects,
    http_client,
    start_harness,
    write_config,
)


@pytest.fixture
async def eager(tmp_path: Path) -> AsyncIterator[Harness]:
    """A pipeline whose provider pushes every 3 commits, or after 0.2 s."""
    started = await start_harness(tmp_path, max_commits=3, interval="200ms")
    yield started
    await started.runtime.close()


async def test_max_commits_and_interval_trigger_pushes(eager: Harness) -> None:
    [writer] = eager.runtime.writers.values()
    await eager.send(*(event("create", name=f"cm{i}", body=configmap(f"cm{i}")) for i in range(3)))

    async def pushed(n: int) -> bool:
        return writer.stats.pushed_commits == n

    await eventually(lambda: pushed(3))  # maxCommits reached: pushed at once
    assert writer.stats.pushes == 1
    await eager.send(event("create", name="cm3", body=configmap("cm3")))
    await eventually(lambda: pushed(4))  # one waiting commit: pushed once the interval passed
    assert writer.stats.pushes == 2
    assert len(await eager.subjects()) == 4


async def test_commits_wait_locally_while_the_remote_is_away(
    eager: Harness, tmp_path: Path
) -> None:
    [writer] = eager.runtime.writers.values()
    await asyncio.to_thread(eager.remote.rename, tmp_path / "away.git")
    await eager.send(*(event("create", name=f"cm{i}", body=configmap(f"cm{i}")) for i in range(5)))
    failures = await eager.runtime.flush()
    assert len(failures) == 1 and "5 commits kept in" in failures[0]
    assert writer.stats.commits == 5 and writer.stats.push_failures >= 1
    # Still ready (events are taken, commits wait), and /readyz?verbose says why to look.
    async with http_client(eager) as client:
        response = await client.get("/readyz", params={"verbose": ""})
        text = await response.text()
    assert response.status == 200, text
    assert f"[!]remote {writer.name} warning: last push failed (5 commits wait" in text

    await asyncio.to_thread((tmp_path / "away.git").rename, eager.remote)
    pushes = writer.stats.pushes
    assert await eager.runtime.flush() == []
    assert writer.stats.pushes == pushes + 1  # one push carries the backlog
    assert await asyncio.to_thread(git_subjects, eager.remote) == [
        f"[CREATE] v1/configmaps/default/cm{i}" for i in range(5)
    ]


def test_targets_on_one_repository_branch_share_one_writer(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    file = write_config(tmp_path / "c.yaml", remote)
    text = file.read_text()
    second = (
        text.split("---")[0]
        .replace("name: origin", "name: again")
        .replace(f"file://{remote}", f"{remote}/")
    )
    target = (
        text.split("---")[1]
        .replace("name: live", "name: other")
        .replace("name: origin", "name: again")
        .replace("path: live", "path: other")
    )
    file.write_text(text + "---" + second + "---" + target)
    runtime = Runtime(load_config([file]), Settings(state_dir=tmp_path / "state"))
    assert len(runtime.writers) == 1


def _branch_on_disk(writer: BranchWriter) -> str:
    """The mirror's branch as a crash would leave it: the ref file the save wrote ("" when
    there is none yet)."""
    ref = writer.mirror.path / "refs" / "heads" / writer.mirror.branch
    return ref.read_text().strip() if ref.exists() else ""


async def test_a_trickle_of_changes_is_saved_together_and_answered_once_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes arriving one batch at a time wait for one save (SAVE_DELAY_S, here long):
    none is answered (its journal entry kept) while its commit is not on disk."""
    monkeypatch.setattr(writer_module, "SAVE_DELAY_S", 3600.0)
    harness = await start_harness(tmp_path, max_commits=1000, interval="1h")
    try:
        [writer] = harness.runtime.writers.values()
        done = []
        for n in range(3):  # each committed before the next comes: a batch each
            done.append(await writer.submit(file_change(n)))
            await eventually(lambda n=n: writer.mirror.unsaved == n + 1)
        assert not any(future.done() for future in done)
        assert await asyncio.to_thread(_branch_on_disk, writer) == ""

        assert await writer.flush() == 3  # saves, answers, pushes
        tip = done[-1].result().commit_id
        assert all(future.result().commit_id for future in done)
        assert await asyncio.to_thread(_branch_on_disk, writer) == tip
        assert await harness.subjects() == ["[CREATE] c0", "[CREATE] c1", "[CREATE] c2"]
    finally:
        await harness.runtime.close()


async def test_a_change_no_one_waits_for_any_more_does_not_stop_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submitter that stops waiting (its task cancelled at a shut-down) while its change
    waits for a save: the save answers the others, and the writer goes on."""
    monkeypatch.setattr(writer_module, "SAVE_DELAY_S", 3600.0)
    harness = await start_harness(tmp_path, max_commits=1000, interval="1h")
    try:
        [writer] = harness.runtime.writers.values()
        first = await writer.submit(file_change(0))
        second = await writer.submit(file_change(1))
        await eventually(lambda: writer.mirror.unsaved == 2)
        first.cancel()
        async with asyncio.timeout(10):  # a writer stopped by it would never answer
            assert await writer.flush() == 2
        assert writer.running and second.result().commit_id
        assert await harness.subjects() == ["[CREATE] c0", "[CREATE] c1"]
    finally:
        await harness.runtime.close()


async def test_a_trickle_is_saved_after_the_delay_without_a_push(tmp_path: Path) -> None:
    """With no push due, the commits of a trickle are saved, and their changes answered,
    once SAVE_DELAY_S has passed."""
    harness = await start_harness(tmp_path, max_commits=1000, interval="1h")
    try:
        [writer] = harness.runtime.writers.values()
        done = [await writer.submit(file_change(n)) for n in range(3)]
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*done)
        assert writer.stats.pushes == 0 and writer.mirror.unsaved == 0
        assert await asyncio.to_thread(_branch_on_disk, writer) == outcomes[-1].commit_id
        assert await asyncio.to_thread(git_subjects, writer.mirror.path) == [
            "[CREATE] c0",
            "[CREATE] c1",
            "[CREATE] c2",
        ]
    finally:
        await harness.runtime.close()


@pytest.mark.parametrize("refusal", ["away", "locked"])
async def test_a_stop_tries_the_push_again_until_the_remote_takes_it(
    tmp_path: Path, refusal: str
) -> None:
    """serve's stop, while the remote refuses the push for a moment (moved away, or its
    branch locked by an update another process has not finished): it tries again, and the
    commits are in the remote when the stop ends, not only in the mirror."""
    harness = await start_harness(
        tmp_path, settings={"retry_push_at_stop": True, "shutdown_timeout_s": 60.0}
    )
    [writer] = harness.runtime.writers.values()
    away = tmp_path / "away.git"
    lock = harness.remote / "refs" / "heads" / "main.lock"
    if refusal == "away":
        await asyncio.to_thread(harness.remote.rename, away)
    else:  # fresh, and naming a commit not ours: nothing may break it
        await asyncio.to_thread(lock.write_text, "1" * 40 + "\n")
    await harness.send(
        *(event("create", name=f"cm{i}", body=configmap(f"cm{i}")) for i in range(3))
    )
    closing = asyncio.create_task(harness.runtime.close())
    await eventually(lambda: writer.stats.push_failures >= 1)
    if refusal == "away":
        await asyncio.to_thread(away.rename, harness.remote)
    else:
        await asyncio.to_thread(lock.unlink)
    async with asyncio.timeout(30):
        await closing
    assert await harness.subjects() == [f"[CREATE] v1/configmaps/default/cm{i}" for i in range(3)]
    assert writer.mirror.unpushed == 0


@pytest.mark.parametrize("retry", [True, False])
async def test_a_stop_leaves_what_it_cannot_push_in_the_mirror(tmp_path: Path, retry: bool) -> None:
    """A remote away for good: serve's stop tries again until a little before its shut-down
    time is over; replay's and snapshot's (their flush has reported the failure) try once.
    Either way the stop ends, and the commits wait in the mirror for the next start."""
    harness = await start_harness(
        tmp_path, settings={"retry_push_at_stop": retry, "shutdown_timeout_s": 3.0}
    )
    [writer] = harness.runtime.writers.values()
    await asyncio.to_thread(harness.remote.rename, tmp_path / "away.git")
    await harness.send(
        *(event("create", name=f"cm{i}", body=configmap(f"cm{i}")) for i in range(3))
    )
    async with asyncio.timeout(20):
        await harness.runtime.close()
    assert writer.stats.commits == 3 and writer.mirror.unpushed == 3
    assert writer.stats.push_failures >= 2 if retry else writer.stats.push_failures == 1
