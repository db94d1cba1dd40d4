"""How a mirror reaches its remote. One implementation per kind of URL, behind one interface.

Today: local paths and ``file://`` URLs. SSH and HTTPS plug in here with their credentials
and host-key checks; nothing outside this module needs to change for them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import pygit2

from audit_reverser.errors import RepositoryError

_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?[^/:]+:(?!//)")


class Transport(Protocol):
    @property
    def url(self) -> str:
        """The URL handed to libgit2."""

    @property
    def display(self) -> str:
        """The URL as it may appear in logs and errors: never with credentials."""

    def callbacks(self) -> pygit2.RemoteCallbacks: ...


def local_path(url: str) -> Path | None:
    """The filesystem path of a local remote (plain path or file:// URL), else None."""
    if url.startswith("file://"):
        return Path(unquote(urlsplit(url).path)).resolve()
    if "://" in url or _SCP_LIKE.match(url):
        return None
    return Path(url).expanduser().resolve()


def remote_key(url: str) -> str:
    """A normalized form of the URL, so that spellings of one repository share a writer."""
    path = local_path(url)
    if path is not None:
        return f"file://{path}"
    if _SCP_LIKE.match(url):  # git@host:owner/repo.git  ->  ssh://git@host/owner/repo.git
        user_host, _, rest = url.partition(":")
        url = f"ssh://{user_host}/{rest}"
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.scheme == "ssh" and parts.username else ""
    path_part = parts.path.rstrip("/").removesuffix(".git")
    return f"{parts.scheme}://{user}{host}{port}{path_part}"


def mirror_name(url: str, branch: str) -> str:
    """A stable, filesystem-safe folder name for the mirror of one remote branch."""
    key = remote_key(url)
    digest = hashlib.sha256(f"{key}\n{branch}".encode()).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", key.rsplit("/", 1)[-1])[:40] or "repo"
    return f"{tail}-{digest}.git"


class _PushReport(pygit2.RemoteCallbacks):
    """Collects per-reference rejections, which libgit2 reports here rather than raising."""

    def __init__(self) -> None:
        super().__init__()
        self.rejected: dict[str, str] = {}

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejected[refname] = message


class LocalTransport:
    """A bare repository on this machine, by path or ``file://`` URL."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def url(self) -> str:
        return str(self._path)

    @property
    def display(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    def callbacks(self) -> pygit2.RemoteCallbacks:
        return _PushReport()


def transport_for(url: str) -> LocalTransport:
    path = local_path(url)
    if path is None:
        raise RepositoryError(
            f"remote {remote_key(url)}: only local paths and file:// URLs are supported by "
            "this version; SSH and HTTPS remotes come with credential support"
        )
    return LocalTransport(path)
