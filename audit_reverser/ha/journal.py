"""``serve --journal redis://…``: the intake's journal (:class:`~audit_reverser.journal.
EventJournal`) kept in Redis instead of files, so that a 200 means "durable in Redis".

Any number of ``serve`` replicas share one journal. Each appends what it receives (any
replica answers the webhook); one of them, the holder of the lease on lane
:data:`INTAKE_LANE`, reads the stream through the consumer group, in order, and writes Git.
The others are standbys: :attr:`RedisJournal.leading` is set when one of them takes the lease
(the holder died or paused past it), and the runtime then has its writers catch up with the
remote before :meth:`RedisJournal.lead` takes over the entries the last holder left and
starts reading. Reads and acknowledgements are fenced in Redis (the lease's value is checked
in the same script), commits and pushes by :meth:`RedisJournal.fence`. A holder that loses
the lease sets :attr:`RedisJournal.lost` and writes nothing more (the process then exits, to
start again as a standby with nothing of its turn left in memory).

An entry is acknowledged (XACK + XDEL) only once its commits are *pushed*: ``done``
(committed in the local mirror) queues it with a mark per writer its event's changes went
to that had unpushed commits then (commits pushed so far + those waiting, from
``progress()``), and it is acknowledged
once each of those writers has pushed that many: a push carries every commit made before it.
So the mirror in ``--state-dir`` is a cache: a new holder drops what its mirror did not push,
reads the unacknowledged entries again and commits what the remote lacks.

Sequence numbers are the stream entry IDs (``ms-n``) as integers, so the seqs ``append``
returns are those ``read`` gives back. Redis failures never stop the intake: ``read``
retries, ``append`` raises :class:`JournalUnavailable` (503), and ``unwritable`` (what
``/readyz`` reports) stays set until a probe finds Redis reachable and durable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from audit_reverser.errors import AuditReverserError, TemporaryError
from audit_reverser.ha.connection import Connection
from audit_reverser.ha.deletions import RedisDeletions
from audit_reverser.ha.lease import DEFAULT_LEASE_S, Lease, LeaseLost
from audit_reverser.ha.stream import DEFAULT_PREFIX, Entry, Incoming, StaleWriter, StreamJournal
from audit_reverser.journal import Batch, JournalUnavailable, Record
from audit_reverser.journal import Entry as JournalEntry

log = logging.getLogger(__name__)

INTAKE_LANE = "intake"
# How often Redis is probed (durability, backlog) and pushed entries acknowledged.
PROBE_S = 0.5
# The per-ms counter of a stream ID stays far below this (one XADD per event).
_SEQ_BITS = 20

# Per writer: (commits pushed so far, commits waiting in its mirror).
Progress = Callable[[], Mapping[str, tuple[int, int]]]


def seq_of(entry_id: str) -> int:
    ms, _, n = entry_id.partition("-")
    return (int(ms) << _SEQ_BITS) | int(n or 0)


class RedisJournal:
    """The intake's journal in Redis; ``open`` before use, ``close`` after."""

    def __init__(
        self,
        connection: Connection,
        *,
        consumer: str,
        progress: Progress,
        prefix: str = DEFAULT_PREFIX,
        probe_s: float = PROBE_S,
        lease_s: float = DEFAULT_LEASE_S,
        before_acknowledge: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before_acknowledge``: saves what events leave behind besides commits (who asked
        for a deletion, in :attr:`deletions`); awaited before entries are acknowledged, and
        nothing is acknowledged when it raises."""
        self.connection = connection
        self.stream = StreamJournal(connection, prefix=prefix)
        self.lane = self.stream.lane(INTAKE_LANE, consumer)
        self.lease = Lease(connection, INTAKE_LANE, consumer, prefix=prefix, lease_s=lease_s)
        self.deletions = RedisDeletions(connection, lambda: self.lease.fence, prefix=prefix)
        self._before_acknowledge = before_acknowledge
        # Set once this replica holds the lease: from then on it is the writer.
        self.leading = asyncio.Event()
        # Set when it lost the lease after holding it: it writes nothing more.
        self.lost = asyncio.Event()
        self._reading = asyncio.Event()  # set by lead()
        self.consumer = consumer
        self._progress = progress
        self.probe_s = probe_s
        # Why appends fail now (what /readyz shows), None while Redis takes them.
        self.unwritable: str | None = None
        self._available = asyncio.Event()  # clear while unwritable
        self._available.set()
        self._backlog = 0
        # Events stored and not pushed over every lane's stream (a metric; the last probe's).
        self.stream_backlog = 0
        self._last_seq = 0
        self._ids: dict[int, str] = {}  # read, not yet done
        # Committed locally, waiting for the push: the entry and, per writer, the count of
        # pushed commits that means its commits are in the remote.
        self._done: list[tuple[str, dict[str, int]]] = []
        self._unread: deque[Entry] = deque()  # read from Redis, beyond the caller's bytes
        # Entry IDs read and not yet acknowledged: after a failed read (whose answer may
        # have been lost after Redis delivered the entries to us) our own pending entries
        # are read again, and those already taken are left out.
        self._taken: set[str] = set()
        self._through = 0
        self._probe: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """The stream's length: events stored and not yet pushed (as of the last probe,
        plus those appended here since)."""
        return self._backlog

    @property
    def last_seq(self) -> int:
        return self._last_seq

    async def open(self) -> None:
        """Make the stream ready for appends and start trying for the lease (a standby
        until it is taken: see :attr:`leading`) and probing Redis."""
        await self._reclaim()
        await self.lane.ensure()
        self._backlog = await self.lane.length()
        self.stream_backlog = await self.stream.backlog()
        log.info(
            "journal: Redis stream %s, %d events waiting; this replica answers the webhook and "
            "writes Git once it holds the lease of lane %s",
            self.lane.key,
            self._backlog,
            INTAKE_LANE,
        )
        self._keeper = asyncio.create_task(self.lease.keep(self._changed), name="journal lease")
        self._probe = asyncio.create_task(self._probe_loop(), name="journal probe")

    def _changed(self, held: bool) -> None:
        if held and not self.leading.is_set():
            self.leading.set()
        elif not held and self.leading.is_set():
            self._lose("it ran out or was taken by another replica")

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            log.error("journal: this replica lost the writer lease (%s); it writes no more", why)
            self.lost.set()

    @property
    def writing(self) -> bool:
        """Whether this replica is the writer (it reads the stream), not a standby."""
        return self._reading.is_set() and not self.lost.is_set()

    async def until_writing(self) -> None:
        await self._reading.wait()

    async def lead(self) -> None:
        """Once :attr:`leading` is set and the writers caught up with the remote: make every
        entry earlier holders read and did not acknowledge ours, and start reading."""
        await self.fence()
        taken = await self.lane.take_over_fenced(self.lease.fence)
        # What earlier holders left is this writer's to finish, at a stop too: the intake
        # drains through last_seq, which so far counts only what this replica appended.
        newest = await self.lane.newest()
        if newest is not None:
            self._last_seq = max(self._last_seq, seq_of(newest))
        log.info(
            "journal: this replica writes now (lease token %s); %d entries taken over",
            self.lease.token,
            taken,
        )
        self._reading.set()

    async def fence(self) -> None:
        """Raise :class:`LeaseLost` unless this replica holds the lease: before every commit
        batch and every push. Redis is asked; when it cannot answer, our own clock decides,
        whose deadline ends before the key can expire in Redis."""
        try:
            await self.lease.check()
        except LeaseLost as exc:
            self._lose(str(exc))
            raise
        except TemporaryError:
            self.lease.assert_held()

    async def _reclaim(self) -> None:
        """Give up a lease held under our own name: it was taken by an earlier run of ours
        that was killed (our name holds the state directory, which only one process at a
        time may use), so a restart need not wait for it to expire."""
        with self.connection.errors("reading the journal's lease"):
            value = await self.connection.client.get(self.lease.key)
        if value is None:
            return
        text = value.decode() if isinstance(value, bytes) else str(value)
        token, _, holder = text.partition(":")
        if holder == self.lease.holder and token.isdigit():
            self.lease.token = int(token)
            await self.lease.release()

    async def append(self, entries: Sequence[JournalEntry]) -> list[int]:
        batch = [
            Incoming(audit_id=audit_id, cluster=cluster, event=event, lanes=(INTAKE_LANE,))
            for audit_id, cluster, event in entries
        ]
        try:
            ids = await self.stream.append_ids(batch)
        except AuditReverserError as exc:
            self._unwritable(str(exc))
            raise JournalUnavailable(str(exc)) from exc
        # An event stored before (a retried batch) gets seq 0: it is read as that earlier
        # entry, never as this one.
        seqs = [seq_of(entry_id) if entry_id else 0 for entry_id in ids]
        self._backlog += sum(1 for seq in seqs if seq)
        self._last_seq = max(self._last_seq, *seqs)
        return seqs

    async def read(self, limit: int, max_bytes: int) -> Batch:
        await self._reading.wait()
        while not self._unread:
            if self.lost.is_set():
                await asyncio.Future()  # nothing more is read; the runtime stops the intake
            try:
                entries = await self.lane.read_fenced(
                    self.lease.fence, limit, block_s=self.probe_s * 4
                )
            except StaleWriter as exc:
                self._lose(str(exc))
            except AuditReverserError as exc:
                self.lane.read_pending_again()
                self._unwritable(str(exc))
                await asyncio.sleep(self.probe_s)
            else:
                fresh = [e for e in entries if e.entry_id not in self._taken]
                self._taken.update(e.entry_id for e in fresh)
                self._unread.extend(fresh)
        records: list[Record] = []
        size = 0
        while self._unread and len(records) < limit:
            entry = self._unread[0]
            if records and size + len(entry.event) > max_bytes:
                break
            self._unread.popleft()
            seq = seq_of(entry.entry_id)
            self._ids[seq] = entry.entry_id
            size += len(entry.event)
            records.append(
                Record(seq=seq, audit_id=entry.audit_id, cluster=entry.cluster, event=entry.event)
            )
        # Entries read again after a failure may be older than some already handed over.
        self._through = max(self._through, records[-1].seq)
        self._last_seq = max(self._last_seq, self._through)
        return Batch(records=records, through=self._through)

    def done(
        self,
        seq: int,
        tips: dict[str, str | None] | None = None,
        reached: Collection[str] | None = None,
    ) -> None:
        entry_id = self._ids.pop(seq, None)
        if entry_id is not None:
            # The writers the event's changes went to, those it found unchanged included
            # (not only ``tips``): that change may stand on an earlier event's unpushed
            # commit. Not the other writers: one whose remote is away would hold every
            # entry in the stream until --max-backlog refused all events.
            marks = {
                w: pushed + waiting
                for w, (pushed, waiting) in self._progress().items()
                if reached is None or w in reached
            }
            self._done.append((entry_id, {w: m for w, m in marks.items() if m > 0}))

    @staticmethod
    def _pushed(marks: Mapping[str, int], now: Mapping[str, tuple[int, int]]) -> bool:
        """Whether each writer pushed up to its mark, or has nothing waiting (a writer
        gone with a new config has nothing to push either)."""
        for writer, mark in marks.items():
            pushed, waiting = now.get(writer, (mark, 0))
            if pushed < mark and waiting:
                return False
        return True

    async def acknowledge_pushed(self) -> int:
        """Acknowledge the done entries whose commits are pushed; how many."""
        if not self._done:
            return 0
        now = self._progress()
        ready = [entry_id for entry_id, marks in self._done if self._pushed(marks, now)]
        if not ready:
            return 0
        try:
            if self._before_acknowledge is not None:
                await self._before_acknowledge()
            await self.lane.acknowledge_fenced(self.lease.fence, ready)
        except StaleWriter as exc:
            self._lose(str(exc))
            return 0
        acknowledged = set(ready)
        self._taken -= acknowledged
        self._done = [d for d in self._done if d[0] not in acknowledged]
        return len(ready)

    def _unwritable(self, why: str) -> None:
        if self.unwritable is None:
            log.error("journal unavailable: %s", why)
        self.unwritable = why
        self._available.clear()

    async def probe(self) -> None:
        """One round: is Redis durable and reachable, how long is the stream, acknowledge."""
        try:
            if self.unwritable is not None:  # coming back: no stale connection may answer
                await self.connection.forget_idle()
            await self.connection.check()
            self._backlog = await self.lane.length()
            self.stream_backlog = await self.stream.backlog()
            await self.acknowledge_pushed()
        except AuditReverserError as exc:
            self._unwritable(str(exc))
            return
        if self.unwritable is not None:
            log.info("journal available again")
        self.unwritable = None
        self._available.set()

    async def until_available(self) -> None:
        """Return after the next probe that found Redis durable and reachable."""
        await asyncio.sleep(self.probe_s)  # the probe may not have seen it go yet
        await self._available.wait()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            await self.probe()

    async def close(self) -> None:
        """Acknowledge what was pushed, give the lease up, and close the connection."""
        for task in (self._probe, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self.acknowledge_pushed()
            await self.lease.release()
        except AuditReverserError as exc:  # the lease then runs out by itself
            log.warning(
                "journal: at the stop, %s; a standby takes over once the lease runs out", exc
            )
        await self.connection.close()
