"""Lane drivers on a real redis-server, with a Git side played by an in-memory remote that
behaves like one where it matters: pushes are fast-forwards only (never forced), and a push
from a tip that moved is rejected."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence

import orjson
import pytest

from audit_reverser.errors import TemporaryError
from audit_reverser.ha.connection import Connection, JournalSettings, connect
from audit_reverser.ha.lanes import LaneDriver
from audit_reverser.ha.lease import Lease
from audit_reverser.ha.stream import Entry, Incoming, StreamJournal
from tests.redisserver import RedisServer

LANE = "https://git.example/org/repo.git@main"


class Remote:
    """A branch's history as the Audit-IDs of its commits, oldest first."""

    def __init__(self) -> None:
        self.history: list[str] = []
        self.pushes: list[str] = []  # who pushed, in order
        self.changed = asyncio.Condition()

    async def wait_for(self, count: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.history) >= count)


class Sink:
    """One replica's writer: a fetched copy of the remote, commits on top, pushes without
    force. ``pause`` (an Event) holds it after its commits, before its last fence check."""

    def __init__(self, remote: Remote, name: str) -> None:
        self.remote = remote
        self.name = name
        self.fetched = 0
        self.pause: asyncio.Event | None = None
        self.paused = asyncio.Event()

    async def catch_up(self) -> Collection[str]:
        self.fetched = len(self.remote.history)
        return list(self.remote.history)

    async def write(self, entries: Sequence[Entry], fence: Callable[[], Awaitable[None]]) -> None:
        await fence()
        commits = [e.audit_id for e in entries]
        if self.pause is not None:
            self.paused.set()
            await self.pause.wait()
        await fence()
        if len(self.remote.history) != self.fetched:
            raise TemporaryError(
                f"{self.name}: push rejected, the remote moved (not a fast-forward)"
            )
        async with self.remote.changed:
            self.remote.history.extend(commits)
            self.remote.pushes.append(self.name)
            self.remote.changed.notify_all()
        self.fetched = len(self.remote.history)


def _events(numbers: range) -> list[Incoming]:
    return [
        Incoming(
            audit_id=f"audit-{n}",
            cluster="",
            event=orjson.dumps({"auditID": f"audit-{n}"}),
            lanes=(LANE,),
        )
        for n in numbers
    ]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[list[Connection]]:
    opened = [
        await connect(
            JournalSettings(url=redis_server.url, password_file=redis_server.password_file)
        )
        for _ in range(3)
    ]
    yield opened
    for connection in opened:
        await connection.close()


def _driver(connection: Connection, remote: Remote, name: str, lease_s: float = 0.5) -> LaneDriver:
    lease = Lease(connection, LANE, name, lease_s=lease_s)
    lane = StreamJournal(connection).lane(LANE, name)
    return LaneDriver(lease, lane, Sink(remote, name), retry_s=0.05)


@contextlib.asynccontextmanager
async def _running(driver: LaneDriver) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(driver.run(), name=f"driver {driver.lease.holder}")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_appended_events_reach_the_remote_once_and_leave_the_stream(
    replicas: list[Connection],
) -> None:
    remote = Remote()
    journal = StreamJournal(replicas[0])
    await journal.append(_events(range(30)))
    async with _running(_driver(replicas[1], remote, "replica-b")):
        await journal.append(_events(range(30, 60)))
        await asyncio.wait_for(remote.wait_for(60), 30)
        assert remote.history == [f"audit-{n}" for n in range(60)]
        while await journal.backlog():  # noqa: ASYNC110 - acknowledged by another task
            await asyncio.sleep(0.02)


async def test_three_replicas_one_writer_and_a_clean_handover(replicas: list[Connection]) -> None:
    """Only one replica pushes while all three run; when it stops, another carries on."""
    remote = Remote()
    journal = StreamJournal(replicas[0])
    drivers = [_driver(c, remote, f"replica-{n}") for n, c in enumerate(replicas)]
    async with contextlib.AsyncExitStack() as stack:
        tasks = [await stack.enter_async_context(_running(d)) for d in drivers]
        for start in range(0, 40, 10):
            await journal.append(_events(range(start, start + 10)))
            await asyncio.wait_for(remote.wait_for(start + 10), 30)
        first = remote.pushes[0]
        assert set(remote.pushes) == {first}
        index = [d.lease.holder for d in drivers].index(first)
        tasks[index].cancel()  # SIGTERM: it releases its lease
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[index]
        await journal.append(_events(range(40, 50)))
        await asyncio.wait_for(remote.wait_for(50), 30)
    assert remote.history == [f"audit-{n}" for n in range(50)]
    assert remote.pushes[-1] != first


async def test_writer_paused_before_its_push_pushes_nothing_and_nothing_twice(
    replicas: list[Connection],
) -> None:
    """Writer a commits, then stalls (as if SIGSTOPped) past its lease; b takes the lane
    over and commits the same entries, and before b pushes, a resumes: a's fence stops its
    push (the remote would have taken it), b pushes, every event is there once."""
    remote = Remote()
    journal = StreamJournal(replicas[0])
    a = _driver(replicas[1], remote, "replica-a", lease_s=0.3)
    b = _driver(replicas[2], remote, "replica-b", lease_s=0.3)
    assert isinstance(a.sink, Sink) and isinstance(b.sink, Sink)
    a.sink.pause, b.sink.pause = asyncio.Event(), asyncio.Event()
    await journal.append(_events(range(5)))
    async with _running(a) as task_a:
        await asyncio.wait_for(a.sink.paused.wait(), 30)
        # A paused process renews nothing: stop a's renewals, as SIGSTOP would.
        assert a.keeper is not None
        a.keeper.cancel()
        async with _running(b):
            await asyncio.wait_for(b.sink.paused.wait(), 30)
            a.sink.pause.set()  # SIGCONT
            while a.lease.token is not None:  # noqa: ASYNC110 - a finds out in its own task
                await asyncio.sleep(0.02)
            b.sink.pause.set()
            await asyncio.wait_for(remote.wait_for(5), 30)
            await journal.append(_events(range(5, 8)))
            await asyncio.wait_for(remote.wait_for(8), 30)
            assert not task_a.done()
    assert remote.history == [f"audit-{n}" for n in range(8)]
    assert set(remote.pushes) == {"replica-b"}


async def test_new_writer_skips_entries_the_remote_already_has(
    replicas: list[Connection],
) -> None:
    """The old writer pushed, then died before acknowledging: the entries are pending, and
    their Audit-IDs are in the remote; the next writer acknowledges them unwritten."""
    remote = Remote()
    journal = StreamJournal(replicas[0])
    await journal.append(_events(range(4)))
    dead = journal.lane(LANE, "replica-dead")
    read = await dead.read()
    remote.history.extend(e.audit_id for e in read[:3])  # pushed three, then SIGKILL
    async with _running(_driver(replicas[1], remote, "replica-b")):
        await asyncio.wait_for(remote.wait_for(4), 30)
        while await journal.backlog():  # noqa: ASYNC110 - acknowledged by another task
            await asyncio.sleep(0.02)
    assert remote.history == ["audit-0", "audit-1", "audit-2", "audit-3"]


async def test_a_rejected_push_is_tried_again_without_losing_entries(
    replicas: list[Connection],
) -> None:
    """Someone else moved the branch (a person pushing by hand): the push is rejected, the
    writer catches up and writes its entries on top."""
    remote = Remote()
    journal = StreamJournal(replicas[0])
    driver = _driver(replicas[1], remote, "replica-a")
    assert isinstance(driver.sink, Sink)
    driver.sink.pause = asyncio.Event()
    await journal.append(_events(range(3)))
    async with _running(driver):
        await asyncio.wait_for(driver.sink.paused.wait(), 30)
        remote.history.append("by-hand")
        driver.sink.pause.set()
        await asyncio.wait_for(remote.wait_for(4), 30)
    assert remote.history == ["by-hand", "audit-0", "audit-1", "audit-2"]
