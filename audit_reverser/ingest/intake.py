"""The one door for events, from the webhook or from log files.

:meth:`Intake.triage` does the cheap part in the caller (filter on the decoded JSON, parse,
route), so that a request is answered quickly; :meth:`Intake.submit` queues what is kept for
one named worker task that feeds the processor strictly in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from audit_reverser.errors import EventError
from audit_reverser.events import AuditEvent, parse_event
from audit_reverser.pipeline.filter import Skip, classify_raw
from audit_reverser.pipeline.processor import Processor

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Triage:
    """What one batch held: the events to process, and counts of the rest."""

    kept: list[AuditEvent] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, object]:
        return {
            "received": len(self.kept) + sum(self.skipped.values()),
            "kept": len(self.kept),
            "skipped": dict(sorted(self.skipped.items())),
        }


class Intake:
    def __init__(self, processor: Processor, *, queue_size: int = 10_000) -> None:
        self.processor = processor
        self.stats = processor.stats
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None

    def triage(self, items: Iterable[object], *, cluster: str = "", source: str = "") -> Triage:
        result = Triage()
        for raw in items:
            self.stats.received += 1
            reason = classify_raw(raw) if isinstance(raw, Mapping) else Skip.MALFORMED
            if reason is None:
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
                        continue
                    reason = routes
            self.stats.skip(reason)
            result.skipped[reason.value] += 1
        return result

    async def submit(self, events: Iterable[AuditEvent]) -> None:
        for event in events:
            await self._queue.put(event)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="intake")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def drain(self) -> None:
        """Wait until every submitted event has been handed to its writers."""
        await self._queue.join()

    async def close(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self.processor.process(event)
            except Exception:  # one event must never stop the stream; it is logged and counted
                log.exception("event %s could not be processed", event.audit_id)
                self.stats.skip(Skip.REJECTED)
            finally:
                self._queue.task_done()
