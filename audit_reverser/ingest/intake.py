"""The one door for events, from the webhook, from log files, or left in the journal.

:meth:`Intake.triage` does the cheap part in the caller (filter on the decoded JSON, parse,
route). :meth:`Intake.accept` journals what is kept (when there is a journal) and queues it
for one worker task that feeds the processor strictly in journal order. Events are queued
in the same step that gives them their journal seqs, so the worker's order is the journal's;
the worker waits for a record's fsync before it processes it.

The worker hands the processor, with each event, the events for the same object queued
behind it: one read of the object from the API answers them all.

A journal record is marked done once every commit its event made is in the local repository
(or its event made none). A commit that failed for a temporary reason holds the record: it
is processed again on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from audit_reverser.errors import EventError, TemporaryError
from audit_reverser.events import AuditEvent, parse_event
from audit_reverser.gitstore.types import CommitOutcome
from audit_reverser.journal import Journal, JournalUnavailable, Record
from audit_reverser.pipeline.filter import Skip, classify_raw
from audit_reverser.pipeline.processor import Processor

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 100_000

_ObjectKey = tuple[str, str, str, str, str]  # cluster, group, resource, namespace, name


def _object_of(event: AuditEvent) -> _ObjectKey | None:
    ref = event.object_ref
    if ref is None or not ref.name:
        return None
    return (event.cluster, ref.api_group, ref.resource, ref.namespace, ref.name)


class Overloaded(TemporaryError):
    """More events are accepted but not yet committed than the limit allows."""


@dataclass(kw_only=True, slots=True)
class Triage:
    """What one batch held: the events to process (with their JSON), and counts of the rest."""

    kept: list[AuditEvent] = field(default_factory=list)
    raw: list[Mapping[str, Any]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, object]:
        return {
            "received": len(self.kept) + sum(self.skipped.values()),
            "kept": len(self.kept),
            "skipped": dict(sorted(self.skipped.items())),
        }


@dataclass(frozen=True, slots=True)
class _Item:
    event: AuditEvent
    seq: int | None = None
    stored: asyncio.Future[None] | None = None


class Intake:
    def __init__(
        self,
        processor: Processor,
        *,
        journal: Journal | None = None,
        queue_size: int = 10_000,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        self.processor = processor
        self.stats = processor.stats
        self.journal = journal
        self.max_backlog = max_backlog
        # With a journal the queue is bounded by the backlog check in accept(), which answers
        # 429 instead of waiting: a wait between taking seqs and queueing would break order.
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(0 if journal else queue_size)
        self._task: asyncio.Task[None] | None = None
        self._waiting: dict[_ObjectKey, deque[AuditEvent]] = {}  # queued, per object

    def triage(self, items: Iterable[object], *, cluster: str = "", source: str = "") -> Triage:
        result = Triage()
        for raw in items:
            self.stats.received += 1
            reason = classify_raw(raw) if isinstance(raw, Mapping) else Skip.MALFORMED
            # A status write is almost always bookkeeping, but it may finish a deletion.
            if (
                reason is Skip.STATUS
                and isinstance(raw, Mapping)
                and self.processor.may_finish_deletion(raw, cluster=cluster)
            ):
                reason = None
            if reason is None:
                assert isinstance(raw, Mapping)
                try:
                    event = parse_event(raw, cluster=cluster)
                except EventError as exc:
                    log.warning(
                        "%smalformed audit event skipped: %s", f"{source}: " if source else "", exc
                    )
                    reason = Skip.MALFORMED
                else:
                    routes = self.processor.routes(event)
                    if not isinstance(routes, Skip):
                        result.kept.append(event)
                        result.raw.append(raw)
                        continue
                    reason = routes
            self.stats.skip(reason)
            result.skipped[reason.value] += 1
        return result

    def overloaded(self) -> bool:
        return self.journal is not None and self.journal.backlog >= self.max_backlog

    async def accept(self, triage: Triage, *, cluster: str = "") -> None:
        """Queue the kept events; with a journal, return only once they are on disk.

        Raises :class:`Overloaded` or :class:`JournalUnavailable`: nothing was accepted then,
        and the sender should retry later.
        """
        if not triage.kept:
            return
        if self.journal is None:
            for event in triage.kept:
                self._index(event)
                await self._queue.put(_Item(event))
            return
        if self.journal.backlog + len(triage.kept) > self.max_backlog:
            raise Overloaded(
                f"{self.journal.backlog} accepted events are waiting for Git (limit "
                f"{self.max_backlog})"
            )
        entries = [
            (event.audit_id, cluster, orjson.dumps(raw))
            for event, raw in zip(triage.kept, triage.raw, strict=True)
        ]
        seqs, stored = self.journal.append(entries)
        for event, seq in zip(triage.kept, seqs, strict=True):
            self._index(event)
            self._queue.put_nowait(_Item(event, seq, stored))
        # Shielded: a client that goes away must not cancel the fsync others wait for.
        await asyncio.shield(stored)

    def resume(self, records: Sequence[Record]) -> None:
        """Queue journal records a previous run accepted but did not commit."""
        assert self.journal is not None
        for record in records:
            try:
                raw = orjson.loads(record.event)
                event = parse_event(raw, cluster=record.cluster)
            except (orjson.JSONDecodeError, EventError) as exc:  # only a bug could store these
                log.error(
                    "journal record %d (%s) is unreadable: %s", record.seq, record.audit_id, exc
                )
                self.journal.done(record.seq)
                continue
            self._index(event)
            self._queue.put_nowait(_Item(event, record.seq))

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
        seen = {event.audit_id}  # the same auditID queued twice is one event
        later = []
        for other in waiting:
            if other.audit_id not in seen:
                seen.add(other.audit_id)
                later.append(other)
        return later

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="intake")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def drain(self) -> None:
        """Wait until every queued event has been handed to its writers."""
        await self._queue.join()

    async def close(self) -> None:
        await self.drain()
        await self.stop()

    async def stop(self) -> None:
        """Stop the worker now; what is still queued stays in the journal."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._handle(item)
            finally:
                self._queue.task_done()

    async def _handle(self, item: _Item) -> None:
        later = self._later(item.event)
        if item.stored is not None:
            try:
                await asyncio.shield(item.stored)
            except JournalUnavailable:
                return  # never acknowledged: the sender sends it again
        try:
            futures = await self.processor.process(item.event, later)
        except TemporaryError as exc:
            log.error("event %s held for the next start: %s", item.event.audit_id, exc)
            return
        except Exception:  # one event must never stop the stream; it is logged and counted
            log.exception("event %s could not be processed", item.event.audit_id)
            self.stats.skip(Skip.REJECTED)
            futures = []
        self._track(item, futures)

    def _track(self, item: _Item, futures: list[asyncio.Future[CommitOutcome]]) -> None:
        """Mark the event's journal record done once all its commits are settled."""
        journal, seq = self.journal, item.seq
        remaining = len(futures)

        def settled(_: object = None) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining > 0:
                return
            tips: dict[str, str | None] = {}
            held = False
            for future in futures:
                if future.cancelled():
                    held = True
                    continue
                error = future.exception()  # also marks a failure as seen
                if error is None:
                    outcome = future.result()
                    if outcome.commit_id is not None:
                        tips[outcome.writer] = outcome.commit_id
                elif isinstance(error, TemporaryError):
                    held = True
            if journal is None or seq is None:
                return
            if held:
                log.error("event %s held in the journal for the next start", item.event.audit_id)
            else:
                journal.done(seq, tips)

        if not futures:
            remaining = 1
            settled()
        for future in futures:
            future.add_done_callback(settled)
