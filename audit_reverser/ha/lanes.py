"""Driving one lane in HA mode: hold its lease, and while held, feed its stream's entries to
the lane's Git writer and acknowledge them once they are pushed.

On each takeover the driver makes the pending entries of earlier writers its own and asks
the sink to catch up with the remote (fetch); entries whose Audit-ID the remote already
holds are acknowledged without being written again. The sink checks the lease (the
``fence`` it is given) before it commits and before it pushes; a :class:`LeaseLost` there
ends this replica's turn and leaves the entries pending for the next writer. Its claims,
reads and acknowledgements are fenced in Redis too (:class:`StaleWriter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

from audit_reverser.errors import TemporaryError
from audit_reverser.ha.lease import Lease
from audit_reverser.ha.stream import Entry, Lane, StaleWriter

log = logging.getLogger(__name__)

# After a failed write (remote down), the entries are tried again after this long.
RETRY_S = 5.0
BATCH = 200


class LaneSink(Protocol):
    """The Git side of one lane, as HA needs it."""

    async def catch_up(self) -> Collection[str]:
        """Fetch the remote; the Audit-IDs in its recent history (those entries may hold)."""
        ...

    async def write(self, entries: Sequence[Entry], fence: Callable[[], Awaitable[None]]) -> None:
        """Commit the entries and push them, awaiting ``fence()`` before committing and
        before pushing; return once they are in the remote. Raise :class:`TemporaryError`
        when they are not (remote down, push rejected), :class:`LeaseLost` from ``fence``."""
        ...


class LaneDriver:
    def __init__(
        self, lease: Lease, lane: Lane, sink: LaneSink, *, retry_s: float = RETRY_S
    ) -> None:
        self.lease = lease
        self.lane = lane
        self.sink = sink
        self.retry_s = retry_s
        self.takeovers = 0
        self._held = asyncio.Event()
        self.keeper: asyncio.Task[None] | None = None

    def _changed(self, held: bool) -> None:
        if held:
            self._held.set()
        else:
            self._held.clear()

    async def run(self) -> None:
        """Until cancelled: wait for the lease, write while it is held, and release it when
        stopped so another replica takes over at once."""
        keeper = asyncio.create_task(self.lease.keep(self._changed), name=f"lease {self.lane.name}")
        self.keeper = keeper
        try:
            while True:
                await self._held.wait()
                try:
                    await self._turn()
                except StaleWriter as exc:  # LeaseLost, or a fenced step refused
                    log.warning("lane %s: %s", self.lane.name, exc)
                    self._held.clear()
                except TemporaryError as exc:
                    log.error("lane %s: %s; trying again in %gs", self.lane.name, exc, self.retry_s)
                    await asyncio.sleep(self.retry_s)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            with contextlib.suppress(TemporaryError):
                await asyncio.shield(self.lease.release())

    async def _turn(self) -> None:
        """One stretch as the lane's writer: take over, catch up, then write what comes."""
        await self.lease.check()
        claimed = await self.lane.take_over_fenced(self.lease.fence)
        present = set(await self.sink.catch_up())
        self.takeovers += 1
        log.info(
            "lane %s: %s writes (token %s), %d entries taken over",
            self.lane.name,
            self.lease.holder,
            self.lease.token,
            claimed,
        )
        while True:
            await self.lease.check()
            fence = self.lease.fence
            entries = await self.lane.read_fenced(fence, BATCH, block_s=self.lease.lease_s / 3)
            if not entries:
                continue
            fresh = [e for e in entries if e.audit_id not in present]
            if fresh:
                await self.sink.write(fresh, self.lease.check)
            await self.lane.acknowledge_fenced(fence, [e.entry_id for e in entries])
