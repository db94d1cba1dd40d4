"""The shared journal: accepted events in Redis Streams, one stream per writer *lane* (a
repository branch), read by whoever holds that lane's lease through one consumer group.

Keys, under a prefix (default ``audit-reverser``)::

    {prefix}:stream:{lane}          the lane's entries: id, cluster, event (JSON)
    {prefix}:seen:{cluster}/{id}    an auditID already appended (expires after ``seen_ttl_s``)
    {prefix}:lanes                  the set of lanes, to sum the backlog

An append is one Lua script (atomic, and written to the AOF as one unit): an event whose
seen-key exists is skipped, so a batch the apiserver retries against another replica is
stored once. The script's answer is sent only after the durability commands queued behind
it (WAITAOF or WAIT, :mod:`.connection`) confirm it, so a caller that gets no exception may
answer 200. Entries are acknowledged *and deleted* together once their commits are pushed:
the stream's length is the backlog, and nothing leaves it before it is in the remote.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from audit_reverser.errors import TemporaryError
from audit_reverser.ha.connection import Connection

GROUP = "writers"
DEFAULT_PREFIX = "audit-reverser"
# Longer than any apiserver retry of one batch (as the file journal keeps its auditIDs); the
# remote's history covers anything older (the writer skips Audit-IDs it finds there). Each
# seen-key costs ~90 bytes of Redis memory for this long (docs/ha.md).
DEFAULT_SEEN_TTL_S = 600.0

# KEYS: the lanes set, then for each event its seen-key and its lanes' stream keys.
# ARGV: ttl ms, group, then for each event: cluster, auditID, event JSON, number of lanes.
# The seen-key is set after the entries: Redis does not roll back a script that fails
# half-way (out of memory), and an entry without its seen-key can only be a duplicate (the
# writer skips Audit-IDs it has), where a seen-key without its entry would be a lost event.
_APPEND = """
local ttl, group = ARGV[1], ARGV[2]
local k, a, ids = 2, 3, {}
while a <= #ARGV do
  local cluster, id, event, lanes = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local first = ''
  if redis.call('EXISTS', KEYS[k]) == 0 then
    for i = 1, lanes do
      local stream = KEYS[k + i]
      if redis.call('EXISTS', stream) == 0 then
        redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
        redis.call('SADD', KEYS[1], stream)
      end
      local added = redis.call('XADD', stream, '*', 'id', id, 'cluster', cluster, 'event', event)
      if i == 1 then first = added end
    end
    redis.call('SET', KEYS[k], '1', 'PX', ttl)
  end
  ids[#ids + 1] = first
  k = k + lanes + 1
  a = a + 4
end
return ids
"""

_ACKNOWLEDGE = """
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"""

# Fenced variants, for the lease holder: KEYS[2] is the lease key, ARGV[1] the holder's
# value (``TOKEN:HOLDER``). Checked in the same atomic step as the read or acknowledgement,
# so a writer that lost its lease (paused past it) can neither take entries the new holder
# would then never see, nor acknowledge entries it did not push.
_FENCED_ACKNOWLEDGE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, 3))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
"""
# ARGV: value, group, consumer, count, cursor. Answers {1, last ID read, then ID, fields…
# per entry} (an entry deleted while pending has no fields and is left out), {1, last
# entry ID of the stream} when there is nothing to read, {0} when the lease is another's.
_FENCED_READ = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0} end
local found = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
  'STREAMS', KEYS[1], ARGV[5])
if not found or #found[1][2] == 0 then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if newest[1] then return {1, newest[1][1]} end
  return {1, '0-0'}
end
local entries = found[1][2]
local out = {1, entries[#entries][1]}
for _, entry in ipairs(entries) do
  if entry[2] then
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2]
  end
end
return out
"""

# ARGV: value, group, consumer, cursor, count. Answers {1, next cursor, entries claimed}
# ("0-0": all claimed), {0} when the lease is another's.
_FENCED_CLAIM = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0} end
local found = redis.call('XAUTOCLAIM', KEYS[1], ARGV[2], ARGV[3], 0, ARGV[4], 'COUNT', ARGV[5])
return {1, found[1], #found[2]}
"""

_ACK_CHUNK = 1000

_BACKLOG = """
local total = 0
for _, stream in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  total = total + redis.call('XLEN', stream)
end
return total
"""


class StaleWriter(TemporaryError):
    """The lease this writer read or acknowledged under is another's now."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Fence:
    """A lease as Redis stores it: reads and acknowledgements go through only while
    ``key`` holds ``value``."""

    key: str
    value: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Incoming:
    """One accepted event and the lanes (writer branches) its routes lead to."""

    audit_id: str  # the event's key (events.EventKey), by which an event sent again is known
    cluster: str
    event: bytes
    lanes: Sequence[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    """One event as its lane's writer reads it; ``entry_id`` is the stream entry's ID."""

    entry_id: str
    audit_id: str
    cluster: str
    event: bytes


class StreamJournal:
    def __init__(
        self,
        connection: Connection,
        *,
        prefix: str = DEFAULT_PREFIX,
        seen_ttl_s: float = DEFAULT_SEEN_TTL_S,
    ) -> None:
        self.connection = connection
        self.prefix = prefix
        self.seen_ttl_s = seen_ttl_s
        self._append = connection.client.register_script(_APPEND)
        self._backlog = connection.client.register_script(_BACKLOG)
        self._acknowledge = connection.client.register_script(_ACKNOWLEDGE)
        self._fenced_acknowledge = connection.client.register_script(_FENCED_ACKNOWLEDGE)
        self._fenced_read = connection.client.register_script(_FENCED_READ)
        self._fenced_claim = connection.client.register_script(_FENCED_CLAIM)

    def stream_key(self, lane: str) -> str:
        return f"{self.prefix}:stream:{lane}"

    def _seen_key(self, cluster: str, audit_id: str) -> str:
        return f"{self.prefix}:seen:{cluster}/{audit_id}"

    async def append(self, batch: Sequence[Incoming]) -> int:
        """Store the batch's events not stored before, durably; returns how many were new.
        See :meth:`append_ids`."""
        return sum(1 for entry_id in await self.append_ids(batch) if entry_id is not None)

    async def append_ids(self, batch: Sequence[Incoming]) -> list[str | None]:
        """Store the batch's events not stored before, durably; returns, per event, its
        entry ID in its first lane's stream, or None when it was stored before.

        Raises :class:`~.connection.RedisUnavailable` when Redis cannot be reached or does
        not confirm durability in time: then nothing may be acknowledged (it may or may not
        be stored; a retry stores it at most once)."""
        if not batch:
            return []
        keys: list[str] = [f"{self.prefix}:lanes"]
        args: list[Any] = [int(self.seen_ttl_s * 1000), GROUP]
        for item in batch:
            keys.append(self._seen_key(item.cluster, item.audit_id))
            keys.extend(self.stream_key(lane) for lane in item.lanes)
            args.extend((item.cluster, item.audit_id, item.event, len(item.lanes)))
        with self.connection.errors("appending events"):
            async with self.connection.client.pipeline(transaction=False) as pipe:
                await self._append(keys=keys, args=args, client=pipe)
                self.connection.durable_commands(pipe)
                answers = await pipe.execute()
        self.connection.confirm(answers)
        return [_text(entry_id) or None for entry_id in answers[0]]

    async def backlog(self) -> int:
        """Events stored and not yet pushed, over all lanes."""
        with self.connection.errors("reading the backlog"):
            return int(await self._backlog(keys=[f"{self.prefix}:lanes"]))

    def lane(self, lane: str, consumer: str) -> Lane:
        return Lane(self, lane, consumer)


class Lane:
    """One lane as its writer sees it: read, take over what another writer left, acknowledge.

    Only the lane's lease holder uses this (``consumer`` names the replica); the group is
    there for its pending-entries list, which says what was delivered but not pushed."""

    def __init__(self, journal: StreamJournal, lane: str, consumer: str) -> None:
        self.journal = journal
        self.connection = journal.connection
        self.name = lane
        self.key = journal.stream_key(lane)
        self.consumer = consumer
        # The consumer's own pending entries are read again first ("0"), then new ones (">").
        self._cursor: str | None = "0"
        # The newest entry ID seen by a fenced read that found nothing: what to wait after.
        self._newest = "0-0"

    async def take_over(self) -> int:
        """Make every entry delivered to earlier writers (and never acknowledged) ours, to be
        read again by :meth:`read`; returns how many."""
        client, claimed, start = self.connection.client, 0, "0-0"
        with self.connection.errors(f"taking over lane {self.name}"):
            await _ensure_group(client, self.key, f"{self.journal.prefix}:lanes")
            while True:
                answer = await client.xautoclaim(
                    self.key, GROUP, self.consumer, min_idle_time=0, start_id=start, count=500
                )
                start, entries = _text(answer[0]), answer[1]
                claimed += len(entries)
                if start == "0-0":
                    break
        self._cursor = "0"
        return claimed

    async def take_over_fenced(self, fence: Fence) -> int:
        """:meth:`take_over`, for the lease holder only: raises :class:`StaleWriter` when
        ``fence`` is not what Redis holds (a writer paused past its lease would otherwise
        claim the new holder's pending entries, which nobody would read before the next
        takeover)."""
        claimed, start = 0, "0-0"
        with self.connection.errors(f"taking over lane {self.name}"):
            await _ensure_group(self.connection.client, self.key, f"{self.journal.prefix}:lanes")
            while True:
                answer = await self.journal._fenced_claim(
                    keys=[self.key, fence.key],
                    args=[fence.value, GROUP, self.consumer, start, 500],
                )
                if int(answer[0]) == 0:
                    raise StaleWriter(f"lane {self.name}: the lease is another's; not taken over")
                start, claimed = _text(answer[1]), claimed + int(answer[2])
                if start == "0-0":
                    break
        self._cursor = "0"
        return claimed

    async def newest(self) -> str | None:
        """The ID of the stream's newest entry, None while it is empty."""
        with self.connection.errors(f"reading lane {self.name}"):
            answer = await self.connection.client.xrevrange(self.key, count=1)
        entry_id = answer[0][0] if answer else None
        return None if entry_id is None else _text(entry_id)

    async def read(self, count: int = 100, block_s: float | None = None) -> list[Entry]:
        """The next entries: first those delivered to us before and not acknowledged, then
        new ones (waiting up to ``block_s`` for one when there is none; at most the
        connection's timeout, below which the socket's own timeout lies)."""
        client = self.connection.client
        with self.connection.errors(f"reading lane {self.name}"):
            if self._cursor is not None:
                answer = await client.xreadgroup(
                    GROUP, self.consumer, {self.key: self._cursor}, count=count
                )
                entries = _entries(answer, self.key)
                if entries:
                    self._cursor = entries[-1].entry_id
                    return entries
                self._cursor = None
            block = None if block_s is None else int(min(block_s, self.connection.timeout_s) * 1000)
            answer = await client.xreadgroup(
                GROUP, self.consumer, {self.key: ">"}, count=count, block=block
            )
            return _entries(answer, self.key)

    async def acknowledge(self, entry_ids: Sequence[str]) -> None:
        """Entries whose commits are in the remote: out of the pending list and the stream,
        in one transaction, durably."""
        script = self.journal._acknowledge
        await self._acknowledge_in_chunks(
            entry_ids,
            lambda pipe, chunk: script(keys=[self.key], args=[GROUP, *chunk], client=pipe),
        )

    async def _acknowledge_in_chunks(
        self, entry_ids: Sequence[str], queue: Callable[[Any, Sequence[str]], Awaitable[Any]]
    ) -> list[Any]:
        """Queue an acknowledging script per chunk of ``entry_ids`` in one pipeline, with the
        durability commands after them; the scripts' answers, or none when there were no
        entries."""
        if not entry_ids:
            return []
        with self.connection.errors(f"acknowledging entries of lane {self.name}"):
            async with self.connection.client.pipeline(transaction=False) as pipe:
                # Chunks: a Lua call unpacks its arguments onto a stack of limited size.
                for start in range(0, len(entry_ids), _ACK_CHUNK):
                    await queue(pipe, entry_ids[start : start + _ACK_CHUNK])
                self.connection.durable_commands(pipe)
                answers: list[Any] = await pipe.execute()
        self.connection.confirm(answers)
        return answers[: _chunks(len(entry_ids))]

    async def ensure(self) -> None:
        """Create the stream and its group if missing (a replica that only appends may
        start before any writer)."""
        with self.connection.errors(f"opening lane {self.name}"):
            await _ensure_group(self.connection.client, self.key, f"{self.journal.prefix}:lanes")

    async def read_fenced(
        self, fence: Fence, count: int = 100, block_s: float | None = None
    ) -> list[Entry]:
        """:meth:`read`, for the lease holder only: raises :class:`StaleWriter` when
        ``fence`` is not what Redis holds, and takes no entry then. May return no entries
        (deleted while pending, or none came within ``block_s``)."""
        if self._cursor is not None:
            last, entries = await self._read_under(fence, count, self._cursor)
            if last is not None:
                self._cursor = last
                return entries
            self._cursor = None
        newest, entries = await self._read_under(fence, count, ">")
        if newest is not None or not block_s:
            return entries
        # Nothing new: wait (without taking anything) for an entry after the newest one.
        block = int(min(block_s, self.connection.timeout_s) * 1000)
        with self.connection.errors(f"reading lane {self.name}"):
            await self.connection.client.xread({self.key: self._newest}, count=1, block=block)
        return (await self._read_under(fence, count, ">"))[1]

    def read_pending_again(self) -> None:
        """Read our own pending entries first again: a read whose answer was lost may
        have made entries ours that we never saw."""
        self._cursor = "0"

    async def _read_under(
        self, fence: Fence, count: int, cursor: str
    ) -> tuple[str | None, list[Entry]]:
        """One fenced XREADGROUP: the last entry ID read (None when none was) and the
        entries that still have their fields."""
        with self.connection.errors(f"reading lane {self.name}"):
            answer = await self.journal._fenced_read(
                keys=[self.key, fence.key],
                args=[fence.value, GROUP, self.consumer, count, cursor],
            )
        if int(answer[0]) == 0:
            raise StaleWriter(f"lane {self.name}: the lease is another's; reading stopped")
        if len(answer) == 2:
            self._newest = _text(answer[1])
            return None, []
        entries = []
        for at in range(2, len(answer), 2):
            fields = answer[at + 1]
            values = {_text(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
            entries.append(
                Entry(
                    entry_id=_text(answer[at]),
                    audit_id=_text(values["id"]),
                    cluster=_text(values["cluster"]),
                    event=bytes(values["event"]),
                )
            )
        return _text(answer[1]), entries

    async def acknowledge_fenced(self, fence: Fence, entry_ids: Sequence[str]) -> None:
        """:meth:`acknowledge`, for the lease holder only: raises :class:`StaleWriter`
        (acknowledging nothing more) when ``fence`` is not what Redis holds."""
        script = self.journal._fenced_acknowledge
        answers = await self._acknowledge_in_chunks(
            entry_ids,
            lambda pipe, chunk: script(
                keys=[self.key, fence.key], args=[fence.value, GROUP, *chunk], client=pipe
            ),
        )
        if any(int(a) < 0 for a in answers):
            raise StaleWriter(f"lane {self.name}: the lease is another's; not acknowledged")

    async def pending(self) -> int:
        """Entries delivered to a writer and not yet acknowledged."""
        with self.connection.errors(f"reading lane {self.name}"):
            summary = await self.connection.client.xpending(self.key, GROUP)
        return int(summary["pending"])

    async def length(self) -> int:
        with self.connection.errors(f"reading lane {self.name}"):
            return int(await self.connection.client.xlen(self.key))


def _chunks(count: int) -> int:
    return -(-count // _ACK_CHUNK)


async def _ensure_group(client: Any, key: str, lanes: str) -> None:
    """The stream and its group, listed among the lanes (whose lengths make the backlog:
    the append script registers only the streams it creates). Replicas start together: a
    group another one created in the meantime (BUSYGROUP) is the group we wanted."""
    try:
        await client.xgroup_create(key, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise
    await client.sadd(lanes, key)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(answer: Any, key: str) -> list[Entry]:
    """XREADGROUP's answer (RESP3: a map of stream → [entries]) as entries; an entry deleted
    while pending comes back without fields and is left out."""
    if not answer:
        return []
    found = answer.get(key.encode()) or answer.get(key) or [[]]
    entries = []
    for entry_id, fields in found[0]:
        if not fields:
            continue
        values = {_text(name): value for name, value in fields.items()}
        entries.append(
            Entry(
                entry_id=_text(entry_id),
                audit_id=_text(values["id"]),
                cluster=_text(values["cluster"]),
                event=bytes(values["event"]),
            )
        )
    return entries
