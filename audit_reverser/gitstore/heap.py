"""Giving the C heap's free memory back to the system.

glibc's malloc keeps what Python and libgit2 free in its arenas for later use, and returns
a page to the system only when asked or when it lies at the very top of an arena. A writer
makes and drops big blocks (a busy folder's tree is 2 MB at 40,000 files; a push over SSH
or HTTPS builds thousands of small nodes), so after each push it asks: ``malloc_trim``
returns the free pages of every arena, in about a millisecond. (The image also limits the
arenas to two, ``MALLOC_ARENA_MAX`` in the Dockerfile: see docs/operations.md.) Outside
glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Any

_libc: Any = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(_libc, "malloc_trim"):
    _libc = None


def release_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (glibc only)."""
    if _libc is not None:
        _libc.malloc_trim(0)
