"""What the current task is working on, for log lines: the audit event and the GitTarget.

The intake processes one event at a time in its own task; the processor sets these while it
handles an event (and a target), and a logging filter copies them onto every record, so a
JSON log line about an event always says which event and which target, whatever module
wrote it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar, Token

AUDIT_ID: ContextVar[str | None] = ContextVar("audit_id", default=None)
TARGET: ContextVar[str | None] = ContextVar("target", default=None)


class about:  # noqa: N801  (used as a function: ``with about(audit_id=...)``)
    """Log lines written inside are about this event and/or target.

    A class rather than a ``@contextmanager`` generator: the processor enters one per event
    and per target, and the generator's machinery cost more than the variables it sets."""

    __slots__ = ("_audit_id", "_target", "_tokens")

    def __init__(self, *, audit_id: str | None = None, target: str | None = None) -> None:
        self._audit_id = audit_id
        self._target = target
        self._tokens: tuple[Token[str | None] | None, Token[str | None] | None] = (None, None)

    def __enter__(self) -> None:
        audit_id, target = self._audit_id, self._target
        self._tokens = (
            None if audit_id is None else AUDIT_ID.set(audit_id),
            None if target is None else TARGET.set(target),
        )

    def __exit__(self, *exc_info: object) -> None:
        audit_id, target = self._tokens
        if target is not None:
            TARGET.reset(target)
        if audit_id is not None:
            AUDIT_ID.reset(audit_id)


class EventContext(logging.Filter):
    """Puts ``audit_id`` and ``target`` on each record (None when not about an event)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.audit_id = AUDIT_ID.get()
        record.target = TARGET.get()
        return True
