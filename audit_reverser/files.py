"""Files that must survive a crash whole: written aside, synced, renamed into place, and the
directory synced so that the rename itself is on disk. A crash leaves the old content or the
new one, never part of either."""

from __future__ import annotations

import os
from pathlib import Path


def replace_durably(path: Path, data: bytes) -> None:
    """Make ``data`` the content of ``path`` (blocking: call it off the event loop)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """Put the entries of directory ``path`` (new names, renames) on disk."""
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
