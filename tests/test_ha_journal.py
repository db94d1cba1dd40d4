"""RedisJournal (the intake's journal in Redis) on a real redis-server: an entry leaves Redis
only once its commits are pushed, and under steady traffic (a writer that always has new
commits waiting) pushed entries still leave, so the backlog does not grow into 429s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from audit_reverser.ha.connection import JournalSettings, connect
from audit_reverser.ha.journal import INTAKE_LANE, RedisJournal
from audit_reverser.ha.stream import DEFAULT_PREFIX
from tests.redisserver import RedisServer

# Per writer: (commits pushed so far, commits waiting in the mirror), as the runtime reports.
Progress = dict[str, tuple[int, int]]


@pytest.fixture
async def progress() -> Progress:
    return {"repo@main": (0, 0)}


@pytest.fixture
async def journal(redis_server: RedisServer, progress: Progress) -> AsyncIterator[RedisJournal]:
    connection = await connect(
        JournalSettings(url=redis_server.url, password_file=redis_server.password_file)
    )
    journal = RedisJournal(connection, consumer="replica-a", progress=lambda: progress)
    await journal.open()
    await journal.leading.wait()  # the only replica: it takes the lease at once
    await journal.lead()
    yield journal
    await journal.close()


async def _length(redis_server: RedisServer) -> int:
    """The stream's length as redis-cli shows it."""
    key = f"{DEFAULT_PREFIX}:stream:{INTAKE_LANE}"
    return int(await asyncio.to_thread(redis_server.command, "XLEN", key))


async def test_entries_leave_redis_once_pushed_even_while_new_commits_wait(
    journal: RedisJournal, progress: Progress, redis_server: RedisServer
) -> None:
    seqs = await journal.append([(f"id-{n}", "", b"{}") for n in range(3)])
    batch = await journal.read(10, 1 << 20)
    assert [r.seq for r in batch.records] == seqs and batch.through == seqs[-1]

    progress["repo@main"] = (0, 1)  # id-0 committed, not pushed
    journal.done(seqs[0])
    assert await journal.acknowledge_pushed() == 0
    progress["repo@main"] = (0, 2)  # id-1 committed too
    journal.done(seqs[1])
    progress["repo@main"] = (1, 1)  # a push carried id-0's commit; id-1's waits
    assert await journal.acknowledge_pushed() == 1
    assert await _length(redis_server) == 2
    progress["repo@main"] = (2, 1)  # id-1's pushed; a newer commit (id-2's) waits
    journal.done(seqs[2])
    assert await journal.acknowledge_pushed() == 1
    assert await _length(redis_server) == 1
    progress["repo@main"] = (3, 0)
    assert await journal.acknowledge_pushed() == 1
    assert await _length(redis_server) == 0


async def test_a_retried_batch_is_stored_once(
    journal: RedisJournal, redis_server: RedisServer
) -> None:
    first = await journal.append([("id-1", "", b"{}")])
    again = await journal.append([("id-1", "", b"{}"), ("id-2", "", b"{}")])
    assert again[0] == 0 and again[1] > first[0]
    assert journal.last_seq == again[1]
    assert await _length(redis_server) == 2


async def test_a_new_writer_finishes_what_the_one_before_left(
    journal: RedisJournal, redis_server: RedisServer
) -> None:
    """Its stop drains the intake through ``last_seq``: that must cover the entries it took
    over, not only those it appended itself (a stop right after a takeover wrote nothing)."""
    seqs = await journal.append([(f"id-{n}", "", b"{}") for n in range(3)])
    await journal.read(2, 1 << 20)  # delivered, never acknowledged: the writer is killed
    await journal.lease.release()
    connection = await connect(
        JournalSettings(url=redis_server.url, password_file=redis_server.password_file)
    )
    successor = RedisJournal(connection, consumer="replica-b", progress=dict)
    await successor.open()
    try:
        await successor.leading.wait()
        assert successor.last_seq == 0  # it appended nothing
        await successor.lead()
        assert successor.last_seq == seqs[-1]
        read: list[int] = []
        while not read or read[-1] < successor.last_seq:  # the taken-over first, then the rest
            read.extend(r.seq for r in (await successor.read(10, 1 << 20)).records)
        assert read == seqs
    finally:
        await successor.close()
