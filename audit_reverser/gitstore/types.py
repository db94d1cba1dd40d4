"""The values the Git writer accepts and returns; nothing here knows about Kubernetes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    name: str
    email: str


@dataclass(frozen=True, kw_only=True, slots=True)
class FileChange:
    """One commit: set ``path`` to ``content`` (or remove it when None)."""

    path: str
    content: bytes | None
    message: str
    author: Identity
    time: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class CommitOutcome:
    """The commit id made for a change (None when it altered nothing), and by which writer."""

    commit_id: str | None
    writer: str = ""
