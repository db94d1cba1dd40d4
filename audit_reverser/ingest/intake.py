"""The one door for events, from the webhook, from log files, or left in the journal.

:meth:`Intake.triage` does the cheap part in the caller (filter on the decoded JSON, parse,
route). :meth:`Intake.accept` appends what is kept to the journal (when there is one) and
returns once it is on disk. One worker task reads the records back from the journal in seq
order and feeds the processor, holding at most ``window`` events (and ``window_bytes`` of
their JSON) between the journal and the local commit: while Git falls behind, the backlog
waits on disk, so memory stays flat whatever its size, and a start after a crash reads it
from where it is. The events accepted in this run stay parsed and routed (up to 8 windows of
them, ``window_bytes`` of JSON) until the worker reads them back: a burst is not parsed
twice. Without a journal (``replay``, whose files are their own record) accepted events wait
in a queue under the same bound.

The worker hands the processor, with each event, the events for the same object queued
behind it (in memory, read from the journal with it): one read of the object from the API
answers them all.

A journal record is marked done once every commit its event made is in the local repository
(or its event made none). An event whose processing fails for a temporary reason (the
Kubernetes API away, a fleet cluster's rules not read yet) is held and tried again in this
run, and its record waits meanwhile. A commit that failed for a temporary reason holds the
record: it is processed again on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from audit_reverser.errors import EventError, TemporaryError, shown
from audit_reverser.events import JSON_OBJECT, AuditEvent, parse_event
from audit_reverser.gitstore.types import CommitOutcome
from audit_reverser.journal import EventJournal, Record
from audit_reverser.pipeline.filter import Skip, classify_raw
from audit_reverser.pipeline.processor import Processor, Routed

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 100_000
# Events between the journal and the local commit: a few of the writers' commit batches.
DEFAULT_WINDOW = 1_024
# ... and their JSON, so that large objects cannot make the window large.
DEFAULT_WINDOW_BYTES = 8 * 1024 * 1024
# Events accepted in this run are kept parsed and routed until the worker reads them back, so
# that it need not decode and route them a second time (a quarter of its work per kept write
# while a burst waits for Git): at most this many windows of them, and as much of their JSON
# as the window holds (a parsed event takes about 2.5 times its JSON: some 20 MiB; 16 windows
# and twice the JSON took the 80,000-write burst of bench/backlog_memory.py from 125 to 169
# MiB). Beyond that, the backlog is decoded from the journal as it is read.
PARSED_WINDOWS = 8
# A held event is tried again after this long, doubled (up to the maximum) while none of the
# held events goes through. At most HELD_LIMIT wait in memory; the rest wait in the journal
# for the next start.
HELD_RETRY_MIN_S = 1.0
HELD_RETRY_MAX_S = 60.0
HELD_LIMIT = 1_024

_ObjectKey = tuple[str, str, str, str, str]  # cluster, group, resource, namespace, name


def _object_of(event: AuditEvent) -> _ObjectKey | None:
    ref = event.object_ref
    if ref is None or not ref.name:
        return None
    return (event.cluster, ref.api_group, ref.resource, ref.namespace, ref.name)


def _journal_json(raw: Mapping[str, Any]) -> bytes | None:
    """An accepted event's JSON for the journal; None when it cannot be written. orjson
    writes 255 levels of nesting and reads 1,024: deeper objects go through the standard
    library, within the interpreter's recursion limit."""
    try:
        return orjson.dumps(raw)
    except TypeError:
        pass
    try:
        return json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode()
    except (RecursionError, TypeError, ValueError):
        return None


def _say_skip(raw: object, reason: Skip) -> None:
    if isinstance(raw, JSON_OBJECT):
        audit_id, verb, uri = raw.get("auditID"), raw.get("verb"), raw.get("requestURI")
        log.debug("event %s skipped: %s (%s %s)", shown(audit_id), reason.value, verb, shown(uri))
    else:
        log.debug("an item that is not an event skipped: %s", reason.value)


class Overloaded(TemporaryError):
    """More events are accepted but not yet committed than the limit allows."""


@dataclass(kw_only=True, slots=True)
class Triage:
    """What one batch held: the events to process (with their JSON and targets), and counts
    of the rest."""

    kept: list[AuditEvent] = field(default_factory=list)
    raw: list[Mapping[str, Any]] = field(default_factory=list)
    routed: list[Routed] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, object]:
        return {
            "received": len(self.kept) + sum(self.skipped.values()),
            "kept": len(self.kept),
            "skipped": dict(sorted(self.skipped.items())),
        }


class Intake:
    def __init__(
        self,
        processor: Processor,
        *,
        journal: EventJournal | None = None,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        self.processor = processor
        self.stats = processor.stats
        self.journal = journal
        self.window = window
        self.window_bytes = window_bytes
        self.max_backlog = max_backlog
        # Without a journal only: the window bounds it (accept() waits for room).
        self._queue: asyncio.Queue[tuple[AuditEvent, Routed | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # Events taken in (read back or queued) whose commits have not settled yet.
        self.in_memory = 0
        self.in_memory_peak = 0
        self._in_memory_bytes = 0
        self._room = asyncio.Event()
        # Every journal seq up to this one has been handed to the processor (or skipped).
        self._handed = 0
        self._moved = asyncio.Event()
        self._waiting: dict[_ObjectKey, deque[AuditEvent]] = {}  # taken in, per object
        # Events just accepted, parsed and routed, by seq (with the size of their JSON): the
        # worker takes them from here instead of decoding its read-back again. Ordered: the
        # first key of a plain dict whose front was popped takes a scan past the holes.
        self._fresh: OrderedDict[int, tuple[AuditEvent, Routed, int]] = OrderedDict()
        self._fresh_bytes = 0
        self._fresh_limit = PARSED_WINDOWS * window
        self._fresh_bytes_limit = window_bytes
        # Held events (see HELD_RETRY_MIN_S), with their seq, size and routes; the task that
        # tries them again takes turns with the worker, one event at a time.
        self._held: deque[tuple[AuditEvent, int | None, int, Routed | None]] = deque()
        self._held_retry_s = HELD_RETRY_MIN_S
        self._stopping = False
        self._retrying: asyncio.Task[None] | None = None
        self._last_held_error: TemporaryError | None = None
        self._processing = asyncio.Lock()

    def triage(self, items: Iterable[object], *, cluster: str = "", source: str = "") -> Triage:
        result = Triage()
        skipped: Counter[Skip] = Counter()  # counted once per batch, not per event
        received = 0
        say_skips = log.isEnabledFor(logging.DEBUG)  # --log-level debug: a line per skip
        for raw in items:
            received += 1
            reason = classify_raw(raw) if isinstance(raw, JSON_OBJECT) else Skip.MALFORMED
            # A status write is almost always bookkeeping, but it may finish a deletion.
            if (
                reason is Skip.STATUS
                and isinstance(raw, JSON_OBJECT)
                and self.processor.may_finish_deletion(raw, cluster=cluster)
            ):
                reason = None
            if reason is None:
                assert isinstance(raw, JSON_OBJECT)
                try:
                    event = parse_event(raw, cluster=cluster)
                except EventError as exc:
                    log.warning(
                        "%smalformed audit event skipped: %s", f"{source}: " if source else "", exc
                    )
                    reason = Skip.MALFORMED
                else:
                    routed = self.processor.routes(event)
                    if not isinstance(routed, Skip):
                        result.kept.append(event)
                        result.raw.append(raw)
                        result.routed.append(routed)
                        continue
                    reason = routed
            skipped[reason] += 1
            if say_skips:
                _say_skip(raw, reason)
        self.stats.received += received
        for reason, count in skipped.items():
            self.stats.skip(reason, count)
            result.skipped[reason.value] += count
        return result

    def overloaded(self) -> bool:
        return self.journal is not None and self.journal.backlog >= self.max_backlog

    async def accept(self, triage: Triage, *, cluster: str = "") -> None:
        """Take the kept events; with a journal, return only once they are on disk.

        Raises :class:`Overloaded` or :class:`JournalUnavailable`: nothing was accepted then,
        and the sender should retry later.
        """
        await self.processor.claim(cluster)
        if not triage.kept:
            return
        if self.journal is None:
            for event, routed in zip(triage.kept, triage.routed, strict=True):
                await self._wait_for_room()
                self._take(0)
                self._index(event)
                self._queue.put_nowait((event, routed))
            return
        if self.journal.backlog + len(triage.kept) > self.max_backlog:
            raise Overloaded(
                f"{self.journal.backlog} accepted events are waiting for Git (limit "
                f"{self.max_backlog})"
            )
        written = self._journal_jsons(triage)
        if not written:
            return
        entries = [
            (event.key, cluster, data) for event, data in zip(triage.kept, written, strict=True)
        ]
        seqs = await self.journal.append(entries)
        for seq, event, routed, (_, _, data) in zip(
            seqs, triage.kept, triage.routed, entries, strict=True
        ):
            size = len(data)
            if (
                len(self._fresh) >= self._fresh_limit
                or self._fresh_bytes + size > self._fresh_bytes_limit
            ):
                break
            self._fresh[seq] = (event, routed, size)
            self._fresh_bytes += size

    def _journal_jsons(self, triage: Triage) -> list[bytes]:
        """The kept events' JSON for the journal. An event whose JSON cannot be written is
        taken out of ``triage`` (skipped as malformed, with a warning): the rest of its batch
        is accepted."""
        written: list[bytes] = []
        keep: list[int] = []
        for index, raw in enumerate(triage.raw):
            data = _journal_json(raw)
            if data is not None:
                written.append(data)
                keep.append(index)
                continue
            log.warning(
                "event %s skipped: its object is nested too deeply", triage.kept[index].audit_id
            )
            self.stats.skip(Skip.MALFORMED)
            triage.skipped[Skip.MALFORMED.value] += 1
        if len(keep) < len(triage.raw):
            triage.kept = [triage.kept[i] for i in keep]
            triage.raw = [triage.raw[i] for i in keep]
            triage.routed = [triage.routed[i] for i in keep]
        return written

    def _index(self, event: AuditEvent) -> None:
        key = _object_of(event)
        if key is not None:
            self._waiting.setdefault(key, deque()).append(event)

    def _later(self, event: AuditEvent) -> list[AuditEvent]:
        """Take ``event`` out of the index; the events for its object still queued."""
        key = _object_of(event)
        waiting = self._waiting.get(key) if key is not None else None
        if key is None or waiting is None:
            return []
        for position, queued in enumerate(waiting):
            if queued is event:
                del waiting[position]
                break
        if not waiting:
            del self._waiting[key]
        seen = {event.key}  # the same event queued twice is one event
        later = []
        for other in waiting:
            if other.key not in seen:
                seen.add(other.key)
                later.append(other)
        return later

    def start(self) -> None:
        work = self._run_queue() if self.journal is None else self._run_journal(self.journal)
        self._task = asyncio.create_task(work, name="intake")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        self._moved.set()  # drain() waits for nothing more
        if not task.cancelled() and task.exception() is not None:
            log.critical("intake stopped unexpectedly", exc_info=task.exception())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def drain(self) -> None:
        """Wait until every event accepted so far has been handed to its writers."""
        if self.journal is None:
            await self._queue.join()
            return
        target = self.journal.last_seq
        while self._handed < target and self.running:
            self._moved.clear()
            await self._moved.wait()

    async def close(self) -> None:
        await self.drain()
        await self.stop()

    async def stop(self) -> None:
        """Stop the worker now; what it has not processed stays in the journal."""
        self._stopping = True  # a commit failing from now on is not tried again
        for task in (self._task, self._retrying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._held:
            log.warning(
                "%d held events %s",
                len(self._held),
                "stay in the journal for the next start" if self.journal else "are not written",
            )

    # -- the worker --------------------------------------------------------------------------

    async def _run_queue(self) -> None:
        while True:
            event, routed = await self._queue.get()
            try:
                await self._handle(event, None, 0, routed)
            finally:
                self._queue.task_done()

    async def _run_journal(self, journal: EventJournal) -> None:
        while True:
            await self._wait_for_room()
            batch = await journal.read(
                self.window - self.in_memory, self.window_bytes - self._in_memory_bytes
            )
            taken = []
            for record in batch.records:  # all indexed first: each sees those behind it
                event, routed = self._parsed(record)
                if event is None:
                    journal.done(record.seq)
                    continue
                self._take(len(record.event))
                self._index(event)
                taken.append((event, record, routed))
            for event, record, routed in taken:
                await self._handle(event, record.seq, len(record.event), routed)
                # A read can return a whole window of backlog: let requests in between
                # events, so that catching up never holds an acknowledgement back. Not
                # every few events: a request needs a dozen turns of the loop, and
                # yielding every 0.3 ms tripled the ack p50 under load (see README).
                await asyncio.sleep(0)
            self._handed = batch.through
            self._moved.set()

    def _parsed(self, record: Record) -> tuple[AuditEvent | None, Routed | None]:
        """The record's event, and its targets when it was routed in this run."""
        fresh = self._fresh
        # Seqs are read in order: any older entry was read before it was cached.
        while fresh and (oldest := next(iter(fresh))) < record.seq:
            self._fresh_bytes -= fresh.pop(oldest)[2]
        cached = fresh.pop(record.seq, None)
        if cached is None:
            return self._decode(record), None
        event, routed, size = cached
        self._fresh_bytes -= size
        return event, routed

    def _decode(self, record: Record) -> AuditEvent | None:
        try:
            return parse_event(orjson.loads(record.event), cluster=record.cluster)
        except (orjson.JSONDecodeError, EventError) as exc:  # only a bug could store these
            log.error("journal record %d (%s) is unreadable: %s", record.seq, record.audit_id, exc)
            return None

    async def _wait_for_room(self) -> None:
        while self.in_memory >= self.window or self._in_memory_bytes >= self.window_bytes:
            self._room.clear()
            await self._room.wait()

    def _take(self, size: int) -> None:
        self.in_memory += 1
        self._in_memory_bytes += size
        self.in_memory_peak = max(self.in_memory_peak, self.in_memory)

    def _release(self, size: int) -> None:
        self.in_memory -= 1
        self._in_memory_bytes -= size
        self._room.set()

    async def _handle(
        self,
        event: AuditEvent,
        seq: int | None,
        size: int,
        routed: Routed | None,
        *,
        retried: bool = False,
    ) -> None:
        async with self._processing:
            later = self._later(event)
            try:
                futures = await self.processor.process(event, later, routed)
            except TemporaryError as exc:
                self._release(size)
                self._hold(event, seq, size, routed, exc, retried=retried)
                return
            except Exception:  # one event must never stop the stream; logged and counted
                log.exception("event %s could not be processed", event.audit_id)
                self.stats.skip(Skip.REJECTED)
                futures = []
            self._track(event, seq, size, futures)

    def _hold(
        self,
        event: AuditEvent,
        seq: int | None,
        size: int,
        routed: Routed | None,
        error: TemporaryError,
        *,
        retried: bool,
    ) -> None:
        """Keep ``event`` to try it again in this run (its journal record waits)."""
        if len(self._held) >= HELD_LIMIT:
            log.error("event %s held for the next start: %s", event.audit_id, error)
            return
        if not retried:  # a retry round says how many are still held, once
            log.warning(
                "event %s held: %s; tried again in %.0fs",
                event.audit_id,
                error,
                self._held_retry_s,
            )
        self._held.append((event, seq, size, routed))
        self._last_held_error = error
        if self._retrying is None:
            self._retrying = asyncio.create_task(self._retry_held(), name="held events")

    async def _retry_held(self) -> None:
        """Try the held events again, oldest first, until none is held any more."""
        try:
            while self._held:
                await asyncio.sleep(self._held_retry_s)
                held, self._held = self._held, deque()
                tried = len(held)
                try:
                    while held:
                        event, seq, size, routed = held[0]
                        await self._wait_for_room()
                        self._take(size)
                        await self._handle(event, seq, size, routed, retried=True)
                        held.popleft()
                except asyncio.CancelledError:  # the stop: what is left is still held
                    self._held.extendleft(reversed(held))
                    raise
                if not self._held:
                    log.info("%d held events went through", tried)
                    break
                if len(self._held) < tried:  # some went through: the cause may be gone
                    self._held_retry_s = HELD_RETRY_MIN_S
                else:
                    self._held_retry_s = min(self._held_retry_s * 2, HELD_RETRY_MAX_S)
                log.warning(
                    "%d held events: %s; tried again in %.0fs",
                    len(self._held),
                    self._last_held_error,
                    self._held_retry_s,
                )
        finally:
            self._retrying = None
            self._held_retry_s = HELD_RETRY_MIN_S

    def _track(
        self,
        event: AuditEvent,
        seq: int | None,
        size: int,
        futures: list[asyncio.Future[CommitOutcome]],
    ) -> None:
        """Mark the event's journal record done once all its commits are settled."""
        journal = self.journal
        remaining = len(futures)

        def settled(_: object = None) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining > 0:
                return
            self._release(size)
            tips: dict[str, str | None] = {}
            reached: set[str] = set()
            held = False
            failed: TemporaryError | None = None
            for future in futures:
                if future.cancelled():
                    held = True
                    continue
                error = future.exception()  # also marks a failure as seen
                if error is None:
                    outcome = future.result()
                    reached.add(outcome.writer)
                    if outcome.commit_id is not None:
                        tips[outcome.writer] = outcome.commit_id
                elif isinstance(error, TemporaryError):
                    held, failed = True, error
            if journal is None or seq is None:
                return
            if failed is not None and not self._stopping:
                # A commit failed for a while (the mirror's disk full): the event is
                # processed again later in this run, like one whose processing failed. A
                # target it did reach finds nothing new then, or a newer version written.
                self.processor.forget(event.key)
                self._hold(event, seq, size, None, failed, retried=False)
            elif held:
                log.error("event %s held in the journal for the next start", event.audit_id)
            else:
                journal.done(seq, tips, reached)

        if not futures:
            remaining = 1
            settled()
        for future in futures:
            future.add_done_callback(settled)
