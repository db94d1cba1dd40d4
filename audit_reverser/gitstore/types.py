"""The values the Git writer accepts and returns; nothing here knows about Kubernetes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

# Signs a commit: the raw commit object (without a signature) in, an armored signature out
# (SSHSIG, "-----BEGIN SSH SIGNATURE-----"...), which goes into the commit's gpgsig header.
Signer = Callable[[bytes], bytes]


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    name: str
    email: str


@dataclass(frozen=True, kw_only=True, slots=True)
class FileChange:
    """One commit: set ``path`` to ``content`` (or remove it when None).

    ``also`` are files set in the same commit when they differ (a ``.sops.yaml`` beside
    encrypted files); they alone never make a commit. ``fingerprint`` stands for content
    that is new bytes each time although its meaning did not change (ciphertext): when the
    file still holds what was committed with the same fingerprint, nothing is committed.
    """

    path: str
    content: bytes | None
    message: str
    author: Identity
    time: datetime
    also: tuple[tuple[str, bytes], ...] = ()
    fingerprint: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class CommitOutcome:
    """The commit id made for a change (None when it altered nothing), and by which writer;
    for a TreeChange also how many files its commit set and removed."""

    commit_id: str | None
    writer: str = ""
    files_set: int = 0
    files_removed: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class TreeChange:
    """One commit of many files (a snapshot), or of the removals under some folders (a
    prune): ``files`` are set as a FileChange sets its file (fingerprints included); files
    under ``prune`` folders that are not in ``keep`` are removed. ``prune_matching`` are
    folders given as patterns, each path segment matched with :func:`fnmatch.fnmatchcase`
    (``live/*/v1/widgets``). None when nothing changes."""

    files: tuple[FileChange, ...] = ()
    prune: tuple[str, ...] = ()
    prune_matching: tuple[str, ...] = ()
    keep: frozenset[str] = frozenset()
    message: str
    author: Identity
    time: datetime
