"""Who asked for the deletions still pending, kept in Redis when replicas share a journal
there (``{prefix}:deletions``, one JSON value): the
:class:`~audit_reverser.pipeline.deletions.DeletionsStore` of ``serve --journal redis://…``.

A replica's state directory is a cache in that mode, so a memory kept there would be lost
with the writer; here the next writer loads it when it takes over. The writer saves before
it acknowledges the entries of the events that asked (:class:`~audit_reverser.ha.journal.
RedisJournal`'s ``before_acknowledge``): an entry no writer will read again never takes its
request along. It also saves every 0.2 s, for requests no rule selects (they are not in the
stream). Saves and setting aside are fenced by the lease in the same script, so a writer
that lost its lease (paused past it) cannot overwrite what the newer holder saved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from audit_reverser.ha.connection import Connection
from audit_reverser.ha.stream import DEFAULT_PREFIX, Fence, StaleWriter
from audit_reverser.pipeline.deletions import Saved, as_saved

log = logging.getLogger(__name__)

# KEYS: the memories, the lease; ARGV: the holder's lease value, the memories' JSON.
_SAVE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
# KEYS: the memories, where damaged ones are kept, the lease; ARGV: the lease value.
_SET_ASIDE = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('RENAME', KEYS[1], KEYS[2]) end
return 1
"""


class RedisDeletions:
    """``fence()``: the lease as the writer holds it now (asked at each save)."""

    def __init__(
        self, connection: Connection, fence: Callable[[], Fence], *, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.connection = connection
        self.key = f"{prefix}:deletions"
        self._fence = fence
        self._save = connection.client.register_script(_SAVE)
        self._set_aside = connection.client.register_script(_SET_ASIDE)

    @property
    def where(self) -> str:
        return f"Redis key {self.key}"

    async def load(self) -> Saved | None:
        with self.connection.errors("reading who asked for pending deletions"):
            value = await self.connection.client.get(self.key)
        if value is None:
            return None
        try:
            saved = as_saved(orjson.loads(value))
        except orjson.JSONDecodeError as exc:
            await self.set_aside(f"cannot be read: {exc}")
            return None
        if saved is None:
            await self.set_aside("is not a memory of deletions")
        return saved

    async def save(self, saved: Saved) -> None:
        await self._fenced(self._save, [self.key], orjson.dumps(saved), doing="saving")

    async def set_aside(self, why: str) -> None:
        log.warning(
            "%s %s; it is kept as %s:bad, and deletions asked for before this writer took "
            "over are finished in the name of whoever finishes them",
            self.where,
            why,
            self.key,
        )
        await self._fenced(self._set_aside, [self.key, f"{self.key}:bad"], doing="setting aside")

    async def _fenced(self, script: Any, keys: list[str], *args: bytes, doing: str) -> None:
        """Run ``script`` under the lease and wait until it is durable; raises
        :class:`StaleWriter` (changing nothing) when the lease is another's."""
        fence = self._fence()
        with self.connection.errors(f"{doing} who asked for pending deletions"):
            async with self.connection.client.pipeline(transaction=False) as pipe:
                await script(keys=[*keys, fence.key], args=[fence.value, *args], client=pipe)
                self.connection.durable_commands(pipe)
                answers = await pipe.execute()
        self.connection.confirm(answers)
        if not int(answers[0]):
            raise StaleWriter(f"the lease is another's: {doing} {self.where} refused")
