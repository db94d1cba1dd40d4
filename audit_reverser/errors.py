"""The project's own errors, in two kinds that say what the caller should do.

A *permanent* error will not go away by trying again (bad config, refused name): report it
and give up. A *temporary* one might (remote down, timeout): keep the work and retry later.
Lower libraries' exceptions are mapped to these at one boundary each, with ``raise … from``.
"""

from __future__ import annotations


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: hostile input can hold megabyte strings,
    and messages end up in logs and HTTP answers."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AuditReverserError(Exception):
    """Base of every error this project raises on purpose; its text is meant for users."""


class PermanentError(AuditReverserError):
    """Retrying will not help: the input or the configuration must change."""


class TemporaryError(AuditReverserError):
    """Retrying later may succeed; nothing is lost in the meantime."""


class ConfigError(PermanentError):
    """The configuration is invalid; the message names file, document and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class EventError(PermanentError):
    """One audit event is malformed; it is counted and skipped, never guessed."""


class GitStoreError(AuditReverserError):
    """A Git operation failed; subclasses say whether to retry."""


class RemoteUnavailable(TemporaryError, GitStoreError):
    """The remote could not be reached or refused the push; commits stay in the mirror."""


class RepositoryError(PermanentError, GitStoreError):
    """The local mirror or the remote is not usable as configured."""


class MirrorWriteFailed(TemporaryError, GitStoreError):
    """Writing to the local mirror failed (disk full, a lock); the event stays in the journal."""
