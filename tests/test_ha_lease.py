"""One writer per lane, fenced, on a real redis-server: a lease is held by one replica at a
time, a new holder gets a larger token, and a holder that lost its lease (expired while it
was paused or cut off) learns so before it writes anything."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from audit_reverser.ha.connection import Connection, JournalSettings, RedisUnavailable, connect
from audit_reverser.ha.lease import Lease, LeaseLost
from tests.redisserver import RedisServer

LANE = "https://git.example/org/repo.git@main"


async def _connect(server: RedisServer) -> Connection:
    return await connect(JournalSettings(url=server.url, password_file=server.password_file))


@pytest.fixture
async def connections(redis_server: RedisServer) -> AsyncIterator[list[Connection]]:
    """Three replicas' connections to the same Redis."""
    opened = [await _connect(redis_server) for _ in range(3)]
    yield opened
    for connection in opened:
        await connection.close()


async def _until_acquired(lease: Lease) -> None:
    while not await lease.acquire():  # noqa: ASYNC110 - the state is a key expiring in Redis
        await asyncio.sleep(0.02)


async def test_one_holder_at_a_time(connections: list[Connection]) -> None:
    leases = [Lease(c, LANE, f"replica-{n}") for n, c in enumerate(connections)]
    results = await asyncio.gather(*(lease.acquire() for lease in leases))
    assert sorted(results) == [False, False, True]
    holder = leases[results.index(True)]
    await holder.check()
    for other in leases:
        if other is not holder:
            assert not other.held
            with pytest.raises(LeaseLost):
                await other.check()


async def test_each_lane_has_its_own_writer(connections: list[Connection]) -> None:
    main = Lease(connections[0], LANE, "replica-0")
    audit = Lease(connections[1], LANE.replace("@main", "@audit"), "replica-1")
    assert await main.acquire()
    assert await audit.acquire()


async def test_expired_lease_goes_to_the_next_replica_with_a_larger_token(
    connections: list[Connection],
) -> None:
    """The holder stopped renewing (killed, partitioned or paused): once its lease runs out
    in Redis another replica takes it, and the old holder can neither renew nor check."""
    old = Lease(connections[0], LANE, "replica-0", lease_s=0.3)
    new = Lease(connections[1], LANE, "replica-1", lease_s=0.3)
    assert await old.acquire()
    assert old.token is not None
    old_token = old.token
    await asyncio.wait_for(_until_acquired(new), 10)
    assert new.token is not None and new.token > old_token
    with pytest.raises(LeaseLost):
        await old.check()
    assert not await old.renew()
    await old.release()  # a stale release must not free the new holder's lease
    await new.check()


async def test_holder_whose_clock_says_expired_stops_without_asking_redis(
    connections: list[Connection],
) -> None:
    """A process resumed after a pause longer than the lease: its own clock tells it, even
    when Redis has not expired the key yet."""
    now = [0.0]
    lease = Lease(connections[0], LANE, "replica-0", lease_s=30, clock=lambda: now[0])
    assert await lease.acquire()
    assert lease.held
    now[0] = 29.0  # past the lease minus the drift margin
    assert not lease.held
    with pytest.raises(LeaseLost, match="ran out"):
        await lease.check()


async def test_holder_frozen_in_time_is_stopped_by_redis(connections: list[Connection]) -> None:
    """A holder whose clock did not move while it was paused (a frozen VM) still asks Redis
    before it writes, and Redis says the lease is another's."""
    frozen = Lease(connections[0], LANE, "replica-0", lease_s=0.3, clock=lambda: 0.0)
    assert await frozen.acquire()
    other = Lease(connections[1], LANE, "replica-1", lease_s=0.3)
    await asyncio.wait_for(_until_acquired(other), 10)
    assert frozen.held  # by its own clock
    with pytest.raises(LeaseLost, match="another's"):
        await frozen.check()


async def test_kept_lease_outlives_the_lease_time_and_release_hands_it_on(
    connections: list[Connection],
) -> None:
    holder = Lease(connections[0], LANE, "replica-0", lease_s=0.3)
    changes: asyncio.Queue[bool] = asyncio.Queue()
    keeper = asyncio.create_task(holder.keep(changes.put_nowait), name="lease-keeper")
    other = Lease(connections[1], LANE, "replica-1", lease_s=0.3)
    assert await changes.get() is True
    for _ in range(10):  # over three lease times, the other replica never gets it
        assert not await other.acquire()
        await asyncio.sleep(0.1)
    await holder.check()
    keeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await keeper
    await holder.release()
    assert await other.acquire()
    assert changes.empty()  # it never lost the lease meanwhile


async def test_keeper_survives_redis_going_away(
    connections: list[Connection], redis_server: RedisServer
) -> None:
    holder = Lease(connections[0], LANE, "replica-0", lease_s=0.3)
    changes: asyncio.Queue[bool] = asyncio.Queue()
    keeper = asyncio.create_task(holder.keep(changes.put_nowait), name="lease-keeper")
    try:
        assert await changes.get() is True
        await asyncio.to_thread(redis_server.kill)
        assert await changes.get() is False
        with pytest.raises((LeaseLost, RedisUnavailable)):
            await holder.check()
        await asyncio.to_thread(redis_server.start)
        assert await changes.get() is True
        await holder.check()
    finally:
        keeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeper


HOLDER = """
import asyncio, sys
from pathlib import Path
from audit_reverser.ha.connection import JournalSettings, connect
from audit_reverser.ha.lease import Lease, LeaseLost

async def main():
    url, password_file = sys.argv[1], Path(sys.argv[2])
    connection = await connect(JournalSettings(url=url, password_file=password_file))
    lease = Lease(connection, "lane", "paused", lease_s=0.5)
    keeper = asyncio.create_task(
        lease.keep(lambda held: print("held" if held else "lost", flush=True))
    )
    while await asyncio.to_thread(sys.stdin.readline):
        try:
            await lease.check()
            print("may write", flush=True)
        except LeaseLost:
            print("may not write", flush=True)
    keeper.cancel()

asyncio.run(main())
"""


@pytest.fixture
def paused_holder(redis_server: RedisServer, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    process = subprocess.Popen(
        [sys.executable, str(script), redis_server.url, str(redis_server.password_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    with process:  # closes its pipes
        yield process
        process.send_signal(signal.SIGCONT)
        process.kill()


def test_writer_resumed_after_sigstop_learns_it_lost_the_lease(
    paused_holder: subprocess.Popen[str], redis_server: RedisServer
) -> None:
    """A real process holds the lease; SIGSTOP it, let another replica take over, SIGCONT:
    before it would write, it knows it may not."""
    assert paused_holder.stdin is not None and paused_holder.stdout is not None
    assert paused_holder.stdout.readline().strip() == "held"
    paused_holder.send_signal(signal.SIGSTOP)

    async def take_over() -> int | None:
        connection = await _connect(redis_server)
        try:
            lease = Lease(connection, "lane", "replica-b", lease_s=5)
            await asyncio.wait_for(_until_acquired(lease), 20)
            return lease.token
        finally:
            await connection.close()

    assert asyncio.run(take_over()) == 2
    paused_holder.send_signal(signal.SIGCONT)
    paused_holder.stdin.write("check\n")
    paused_holder.stdin.flush()
    answers = [paused_holder.stdout.readline().strip() for _ in range(2)]
    # Its keeper and its check both find out, in either order.
    assert sorted(answers) == ["lost", "may not write"]
