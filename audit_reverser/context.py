"""What the current task is working on, for log lines: the audit event and the GitTarget.

The intake processes one event at a time in its own task; the processor sets these while it
handles an event (and a target), and a logging filter copies them onto every record, so a
JSON log line about an event always says which event and which target, whatever module
wrote it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

AUDIT_ID: ContextVar[str | None] = ContextVar("audit_id", default=None)
TARGET: ContextVar[str | None] = ContextVar("target", default=None)


@contextmanager
def about(*, audit_id: str | None = None, target: str | None = None) -> Iterator[None]:
    """Log lines written inside are about this event and/or target."""
    tokens = []
    if audit_id is not None:
        tokens.append((AUDIT_ID, AUDIT_ID.set(audit_id)))
    if target is not None:
        tokens.append((TARGET, TARGET.set(target)))
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


class EventContext(logging.Filter):
    """Puts ``audit_id`` and ``target`` on each record (None when not about an event)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.audit_id = AUDIT_ID.get()
        record.target = TARGET.get()
        return True
