"""A Git writer in HA mode, on real bare repositories read back with plain ``git``: a
takeover drops what the mirror did not push and answers an event already in the remote's
recent history with its commit; a fence that says no stops commits and pushes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from audit_reverser.errors import TemporaryError
from audit_reverser.gitstore.repository import Mirror
from audit_reverser.gitstore.transport import LocalTransport
from audit_reverser.gitstore.writer import BranchWriter
from tests.conftest import WHO, bare_repo, file_change, git


async def _writer(remote: Path, mirror: Path) -> BranchWriter:
    writer = BranchWriter(
        Mirror(mirror, LocalTransport(remote), "main", WHO), push_interval_s=0, push_max_commits=1
    )
    await writer.open()
    return writer


def _ids(remote: Path) -> list[str]:
    log = git(remote, "log", "--format=%(trailers:key=Audit-ID,valueonly)", "main")
    return [line for line in log.split() if line]


async def test_a_takeover_skips_what_the_remote_holds_and_drops_what_was_not_pushed(
    tmp_path: Path,
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    old = await _writer(remote, tmp_path / "old.git")
    old.start()
    for n in range(3):  # the old writer pushed these, and died before acknowledging them
        await (await old.submit(file_change(n)))
    await old.flush()
    await old.close()
    new = await _writer(remote, tmp_path / "new.git")
    await new.take_over(history=2)  # the newest two only: id-0 is left out on purpose
    new.start()
    outcomes = [await (await new.submit(file_change(n))) for n in (1, 2, 3)]
    await new.flush()
    await new.close()
    assert new.stats.recovered == 2 and new.stats.commits == 1
    pushed = await asyncio.to_thread(git, remote, "log", "--format=%H", "-n", "2", "main~1")
    assert [o.commit_id for o in outcomes[:2]] == pushed.split()[::-1]
    assert await asyncio.to_thread(_ids, remote) == ["id-3", "id-2", "id-1", "id-0"]


async def test_a_fence_that_says_no_stops_commits_and_pushes(tmp_path: Path) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    writer = await _writer(remote, tmp_path / "mirror.git")
    allowed = {"commit": True, "push": True}

    async def fence() -> None:  # asked before each commit batch and each push
        if not allowed["commit"]:
            raise TemporaryError("lease lost")

    def push_fence() -> None:  # asked by the Git thread before each push attempt
        if not allowed["push"]:
            raise TemporaryError("lease ran out")

    writer.fence = fence
    writer.mirror.fence = push_fence
    writer.start()
    await (await writer.submit(file_change(0)))
    await writer.flush()  # committed and pushed
    allowed["push"] = False
    await (await writer.submit(file_change(1)))  # committed; its push is refused
    with pytest.raises(TemporaryError, match="lease ran out"):
        await writer.flush()
    allowed["commit"] = False
    with pytest.raises(TemporaryError, match="lease lost"):
        await (await writer.submit(file_change(2)))  # not even committed
    with pytest.raises(TemporaryError, match="lease lost"):
        await writer.flush()
    await writer.close()
    assert await asyncio.to_thread(_ids, remote) == ["id-0"]
    assert writer.stats.commits == 2 and writer.mirror.unpushed == 1
