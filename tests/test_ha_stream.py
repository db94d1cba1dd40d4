"""The shared journal on a real redis-server: what an append promises, across replicas and
across a Redis restart, and how a lane's writer reads, takes over and acknowledges."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from audit_reverser.ha.connection import Connection, JournalSettings, RedisUnavailable, connect
from audit_reverser.ha.lease import Lease
from audit_reverser.ha.stream import Incoming, StaleWriter, StreamJournal
from tests.redisserver import RedisServer


def _event(n: int, lanes: tuple[str, ...] = ("repo@main",), cluster: str = "") -> Incoming:
    body = {"auditID": f"audit-{n}", "verb": "create", "objectRef": {"name": f"cm-{n}"}}
    return Incoming(audit_id=f"audit-{n}", cluster=cluster, event=orjson.dumps(body), lanes=lanes)


async def _connect(server: RedisServer) -> Connection:
    return await connect(JournalSettings(url=server.url, password_file=server.password_file))


@pytest.fixture
async def journal(redis_server: RedisServer) -> AsyncIterator[StreamJournal]:
    connection = await _connect(redis_server)
    yield StreamJournal(connection)
    await connection.close()


@pytest.fixture
async def other_replica(redis_server: RedisServer) -> AsyncIterator[StreamJournal]:
    """A second serve replica: its own connection to the same Redis."""
    connection = await _connect(redis_server)
    yield StreamJournal(connection)
    await connection.close()


async def test_appended_events_are_read_by_their_lane_in_order(journal: StreamJournal) -> None:
    assert await journal.append([_event(n) for n in range(5)]) == 5
    entries = await journal.lane("repo@main", "replica-a").read()
    assert [e.audit_id for e in entries] == [f"audit-{n}" for n in range(5)]
    assert orjson.loads(entries[2].event)["objectRef"] == {"name": "cm-2"}


async def test_a_batch_retried_on_another_replica_is_stored_once(
    journal: StreamJournal, other_replica: StreamJournal
) -> None:
    batch = [_event(n) for n in range(3)]
    assert await journal.append(batch) == 3
    assert await other_replica.append([*batch, _event(3)]) == 1
    entries = await journal.lane("repo@main", "replica-a").read()
    assert [e.audit_id for e in entries] == ["audit-0", "audit-1", "audit-2", "audit-3"]
    assert await journal.backlog() == 4


async def test_same_audit_id_from_two_clusters_is_two_events(journal: StreamJournal) -> None:
    assert await journal.append([_event(1, cluster="east"), _event(1, cluster="west")]) == 2
    entries = await journal.lane("repo@main", "replica-a").read()
    assert [e.cluster for e in entries] == ["east", "west"]


async def test_an_event_for_two_branches_waits_in_both_lanes(journal: StreamJournal) -> None:
    await journal.append([_event(1, lanes=("repo@main", "repo@audit"))])
    main = await journal.lane("repo@main", "replica-a").read()
    audit = await journal.lane("repo@audit", "replica-a").read()
    assert [e.audit_id for e in main] == [e.audit_id for e in audit] == ["audit-1"]
    assert await journal.backlog() == 2


async def test_acknowledged_entries_leave_the_stream_and_the_backlog(
    journal: StreamJournal,
) -> None:
    await journal.append([_event(n) for n in range(4)])
    lane = journal.lane("repo@main", "replica-a")
    entries = await lane.read()
    await lane.acknowledge([e.entry_id for e in entries[:3]])
    assert await journal.backlog() == 1
    assert await lane.pending() == 1
    assert await lane.length() == 1


async def test_more_acknowledgements_than_one_script_call_takes(journal: StreamJournal) -> None:
    await journal.append([_event(n) for n in range(2500)])
    lane = journal.lane("repo@main", "replica-a")
    entries = await lane.read(count=3000)
    assert len(entries) == 2500
    await lane.acknowledge([e.entry_id for e in entries])
    assert await journal.backlog() == 0


async def test_new_writer_reads_again_what_the_old_one_never_acknowledged(
    journal: StreamJournal, other_replica: StreamJournal
) -> None:
    """Writer a read four entries and pushed the first two before it died; writer b takes
    the lane over and gets the other two first, then what arrives after."""
    await journal.append([_event(n) for n in range(4)])
    old = journal.lane("repo@main", "replica-a")
    read = await old.read()
    await old.acknowledge([e.entry_id for e in read[:2]])
    new = other_replica.lane("repo@main", "replica-b")
    assert await new.take_over() == 2
    await other_replica.append([_event(4)])
    first = await new.read()
    assert [e.audit_id for e in first] == ["audit-2", "audit-3"]
    assert [e.audit_id for e in await new.read()] == ["audit-4"]
    assert await new.read(block_s=0.05) == []


async def test_late_acknowledgement_by_the_old_writer_loses_nothing(
    journal: StreamJournal, other_replica: StreamJournal
) -> None:
    """The old writer's push of entry 0 went through just before it lost the lane: its late
    acknowledgement removes entry 0 only, which the remote already has."""
    await journal.append([_event(n) for n in range(2)])
    old = journal.lane("repo@main", "replica-a")
    read = await old.read()
    new = other_replica.lane("repo@main", "replica-b")
    await new.take_over()
    await old.acknowledge([read[0].entry_id])
    assert [e.audit_id for e in await new.read()] == ["audit-1"]
    assert await journal.backlog() == 1


async def test_acknowledged_appends_survive_a_redis_kill(
    journal: StreamJournal, redis_server: RedisServer
) -> None:
    """SIGKILL gives Redis no chance to save anything: what it confirmed was already in its
    append-only file, and the retry of a confirmed batch stays a duplicate."""
    lane = journal.lane("repo@main", "replica-a")
    await journal.append([_event(n) for n in range(100)])
    delivered = await lane.read(count=10)
    await asyncio.to_thread(redis_server.kill)
    with pytest.raises(RedisUnavailable):
        await journal.append([_event(100)])
    await asyncio.to_thread(redis_server.start)
    assert await journal.append([_event(n) for n in range(101)]) == 1
    assert await journal.backlog() == 101
    # The pending list survived too: the ten delivered entries come back first.
    after = journal.lane("repo@main", "replica-a")
    again = await after.read(count=500)
    assert [e.entry_id for e in again[:10]] == [e.entry_id for e in delivered]
    assert [e.audit_id for e in again] == [f"audit-{n}" for n in range(10)]
    fresh = await after.read(count=500)
    assert [e.audit_id for e in fresh] == [f"audit-{n}" for n in range(10, 101)]


async def test_append_to_a_stopped_redis_is_unavailable(
    journal: StreamJournal, redis_server: RedisServer
) -> None:
    await asyncio.to_thread(redis_server.stop)
    with pytest.raises(RedisUnavailable, match="unavailable while appending events"):
        await journal.append([_event(1)])


async def test_replicas_starting_together_both_open_the_lane(
    journal: StreamJournal, other_replica: StreamJournal, redis_server: RedisServer
) -> None:
    """Two replicas create the lane's group at once: the one that comes second finds it
    there (BUSYGROUP) and carries on, and the lane is listed once for the backlog."""
    lanes = [journal.lane("repo@main", "a"), other_replica.lane("repo@main", "b")]
    await asyncio.gather(*(lane.ensure() for lane in lanes))
    await asyncio.gather(*(lane.ensure() for lane in lanes))
    assert await journal.append([_event(1)]) == 1
    assert await journal.backlog() == 1
    groups = await asyncio.to_thread(redis_server.command, "XINFO", "GROUPS", lanes[0].key)
    assert groups.count("writers") == 1


async def test_a_fenced_read_or_acknowledgement_under_a_lost_lease_takes_nothing(
    journal: StreamJournal, redis_server: RedisServer
) -> None:
    lease = Lease(journal.connection, "repo@main", "a", lease_s=5)
    assert await lease.acquire()
    lane = journal.lane("repo@main", "a")
    await lane.ensure()
    await journal.append([_event(n) for n in range(3)])
    fence = lease.fence
    entries = await lane.read_fenced(fence, count=1)
    assert [e.audit_id for e in entries] == ["audit-0"]
    await asyncio.to_thread(redis_server.command, "DEL", lease.key)  # expired, and taken:
    assert await Lease(journal.connection, "repo@main", "b").acquire()
    with pytest.raises(StaleWriter):
        await lane.read_fenced(fence, count=10)
    with pytest.raises(StaleWriter):
        await lane.acknowledge_fenced(fence, [entries[0].entry_id])
    assert await lane.pending() == 1  # audit-1 and audit-2 were not taken
    assert await lane.length() == 3  # and audit-0 not acknowledged


async def test_a_takeover_under_a_lost_lease_claims_nothing(
    journal: StreamJournal, redis_server: RedisServer
) -> None:
    """A writer paused past its lease resumes with its takeover: it must not make the new
    holder's pending entries its own (nobody would read them before the next takeover)."""
    old = Lease(journal.connection, "repo@main", "a", lease_s=5)
    assert await old.acquire()
    stale = journal.lane("repo@main", "a")
    await stale.ensure()
    await journal.append([_event(n) for n in range(3)])
    fence = old.fence
    await asyncio.to_thread(redis_server.command, "DEL", old.key)  # expired, and taken:
    new = Lease(journal.connection, "repo@main", "b", lease_s=5)
    assert await new.acquire()
    holder = journal.lane("repo@main", "b")
    assert [e.audit_id for e in await holder.read_fenced(new.fence, count=10)] == [
        "audit-0",
        "audit-1",
        "audit-2",
    ]
    with pytest.raises(StaleWriter):
        await stale.take_over_fenced(fence)
    pending = await asyncio.to_thread(redis_server.command, "XPENDING", holder.key, "writers")
    # XPENDING's summary ends with the consumers and their counts: all three still b's.
    assert [line.split()[-1] for line in pending.splitlines()[-2:]] == ['"b"', '"3"']
    assert await holder.take_over_fenced(new.fence) == 3
