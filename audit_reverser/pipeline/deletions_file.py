"""Who asked for the deletions still pending, kept in ``<state-dir>/deletions.json`` so that a
restart between a delete and the write that finishes it keeps the requester as the author
(the :class:`~audit_reverser.pipeline.deletions.DeletionsStore` of one replica; replicas
sharing a journal keep them in Redis, :mod:`audit_reverser.ha.deletions`).

The file is replaced atomically (written aside, fsynced, renamed, the directory fsynced):
a crash leaves the old memories or the new ones, never half of either. A file that cannot be
read is logged and set aside: the deletions it knew of are then finished in the name of
whoever finishes them, as before this file existed, and nothing else is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import orjson

from audit_reverser.files import replace_durably
from audit_reverser.pipeline.deletions import Saved, as_saved

log = logging.getLogger(__name__)

FILE_NAME = "deletions.json"


class DeletionsFile:
    """The file's blocking access runs in a thread."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME

    @property
    def where(self) -> str:
        return str(self.path)

    async def load(self) -> Saved | None:
        return await asyncio.to_thread(self._load)

    async def save(self, saved: Saved) -> None:
        try:
            await asyncio.to_thread(self._save, saved)
        except OSError as exc:  # tried again at the next checkpoint
            raise OSError(f"cannot save {self.path}: {exc}") from exc

    async def set_aside(self, why: str) -> None:
        await asyncio.to_thread(self._set_aside, why)

    def _load(self) -> Saved | None:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            self._set_aside(f"cannot be read: {exc}")
            return None
        saved = as_saved(data)
        if saved is None:
            self._set_aside("is not a memory of deletions")
        return saved

    def _save(self, saved: Saved) -> None:
        replace_durably(self.path, orjson.dumps(saved))

    def _set_aside(self, why: str) -> None:
        log.warning(
            "%s %s; it is kept as %s.bad, and deletions asked for before this start are "
            "finished in the name of whoever finishes them",
            self.path,
            why,
            self.path.name,
        )
        with contextlib.suppress(OSError):
            os.replace(self.path, self.path.with_suffix(".json.bad"))
