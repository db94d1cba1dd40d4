"""One writer per lane: a lease key in Redis with a fencing token.

``{prefix}:lease:{lane}`` holds ``TOKEN:HOLDER`` and expires after the lease time unless its
holder renews it. TOKEN comes from ``INCR {prefix}:fence:{lane}`` when the lease is taken,
so every new holder has a larger one than all before it. Renewing, checking and releasing
compare the whole value in a Lua script, so a holder whose lease expired and was taken by
another can do none of them: it learns it is no longer the writer.

A holder also keeps a local deadline (the time it *sent* its last successful renewal plus
the lease time, minus a margin for clock drift): past it, :attr:`Lease.held` is false
without asking Redis, so a process paused longer than the lease (SIGSTOP, a long GC, a
frozen VM) wakes up knowing it may not write. Before each commit batch and each push the
writer asks :meth:`Lease.check`, which asks Redis too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from audit_reverser.errors import AuditReverserError
from audit_reverser.ha.connection import Connection
from audit_reverser.ha.stream import DEFAULT_PREFIX, Fence, StaleWriter

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 15.0
# Part of the lease time a holder does not count on: Redis' clock and ours may run at
# slightly different rates, and the renewal's answer arrives after Redis set the expiry.
DRIFT = 0.1

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
return token
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_CHECK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class LeaseLost(StaleWriter):
    """This replica is no longer the lane's writer; another one carries on."""


class Lease:
    def __init__(
        self,
        connection: Connection,
        lane: str,
        holder: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connection = connection
        self.lane = lane
        self.holder = holder
        self.lease_s = lease_s
        self._clock = clock
        self.key = f"{prefix}:lease:{lane}"
        self._fence_key = f"{prefix}:fence:{lane}"
        self.token: int | None = None
        # Times this replica took the lease (a metric): each is a takeover of the lane.
        self.taken = 0
        self._deadline = 0.0
        client = connection.client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._check = client.register_script(_CHECK)
        self._release = client.register_script(_RELEASE)

    @property
    def _value(self) -> str:
        return f"{self.token}:{self.holder}"

    @property
    def _ms(self) -> int:
        return int(self.lease_s * 1000)

    @property
    def fence(self) -> Fence:
        """What Redis must hold for a fenced read or acknowledgement of ours to go through."""
        return Fence(key=self.key, value=self._value)

    def assert_held(self) -> None:
        """Raise :class:`LeaseLost` unless we hold the lease by our own clock: what a
        blocking caller (the Git thread, between pushes) can ask without Redis. It changes
        nothing here, as it may run in another thread."""
        if not self.held:
            raise LeaseLost(f"lease of {self.lane} ran out: {self.holder} stops writing")

    @property
    def held(self) -> bool:
        """Whether we hold the lease by our own clock, without asking Redis."""
        return self.token is not None and self._clock() < self._deadline

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it; true when we hold it now (with a new token)."""
        if self.held:
            return await self.renew()
        sent = self._clock()
        with self.connection.errors(f"taking the lease of {self.lane}"):
            token = await self._acquire(
                keys=[self.key, self._fence_key], args=[self.holder, self._ms]
            )
        if token is None:
            self.token = None
            return False
        self.token = int(token)
        self.taken += 1
        self._deadline = sent + self.lease_s * (1 - DRIFT)
        log.info("lease %s: taken by %s with token %d", self.lane, self.holder, self.token)
        return True

    async def renew(self) -> bool:
        """Extend our lease; false (and no longer held) when it expired or is another's."""
        if self.token is None:
            return False
        sent = self._clock()
        with self.connection.errors(f"renewing the lease of {self.lane}"):
            renewed = await self._renew(keys=[self.key], args=[self._value, self._ms])
        if not renewed:
            self._lose("expired and is held by another replica or by nobody")
            return False
        self._deadline = sent + self.lease_s * (1 - DRIFT)
        return True

    async def check(self) -> None:
        """Raise :class:`LeaseLost` unless we hold the lease, by our clock and in Redis:
        asked before every commit batch and every push."""
        if not self.held:
            self._lose("ran out before it was renewed")
        self.assert_held()
        with self.connection.errors(f"checking the lease of {self.lane}"):
            ours = await self._check(keys=[self.key], args=[self._value])
        if not ours:
            self._lose("is held by another replica")
            raise LeaseLost(f"lease of {self.lane} is another's: {self.holder} stops writing")

    async def release(self) -> None:
        """Give the lease up (on shut-down), so another replica takes over at once."""
        if self.token is None:
            return
        with self.connection.errors(f"releasing the lease of {self.lane}"):
            await self._release(keys=[self.key], args=[self._value])
        self.token = None

    def _lose(self, why: str) -> None:
        if self.token is not None:
            log.warning(
                "lease %s: %s lost it (token %d): %s", self.lane, self.holder, self.token, why
            )
        self.token = None

    async def keep(self, on_change: Callable[[bool], None] | None = None) -> None:
        """Hold the lease for as long as we run: take it when it is free, renew it three
        times per lease time. ``on_change(held)`` is told each time that changes; a Redis
        failure is logged and tried again (the lease runs out by itself meanwhile). A lease
        lost and taken again between two rounds (a pause) is told as both changes: someone
        else may have written in between."""
        was, token = False, None
        while True:
            try:
                now = await self.acquire()
            except AuditReverserError as exc:  # also a refusal (a password changed): tried again
                log.error("lease %s: %s", self.lane, exc)
                now = self.held
            if on_change is not None:
                if was and now and self.token != token:
                    on_change(False)
                    on_change(True)
                elif now != was:
                    on_change(now)
            was, token = now, self.token
            await asyncio.sleep(self.lease_s / 3)
