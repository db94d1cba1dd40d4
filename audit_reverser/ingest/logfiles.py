"""Audit log files: JSON Lines of Events (the log backend) or JSON EventList documents.

Files are read in chunks of lines, so memory stays flat on multi-gigabyte logs; a line that
is not JSON is reported with its file and line number, counted, and skipped.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from audit_reverser.errors import PermanentError

log = logging.getLogger(__name__)

CHUNK_LINES = 2_000


@dataclass(frozen=True, slots=True)
class Chunk:
    """Decoded items from a stretch of one file, with bytes read so far for progress."""

    items: list[object]
    malformed: int
    position: int


def _items_of(document: object) -> list[object]:
    """The events in one decoded document: an EventList's items, an Event, or a list."""
    if isinstance(document, Mapping) and document.get("kind") == "EventList":
        items = document.get("items")
        return list(items) if isinstance(items, list) else [document]
    if isinstance(document, list):
        return list(document)
    return [document]


def _open(name: str) -> BinaryIO:
    if name == "-":
        return sys.stdin.buffer
    try:
        return Path(name).open("rb")
    except FileNotFoundError as exc:
        raise PermanentError(f"{name}: no such file") from exc
    except OSError as exc:
        raise PermanentError(f"{name}: cannot read: {exc.strerror}") from exc


def read_chunks(name: str) -> Iterator[Chunk]:
    """Decoded items of one audit log (``-`` is standard input), a chunk at a time."""
    stream = _open(name)
    try:
        first = stream.readline()
        try:
            documents: list[object] | None = [orjson.loads(first)] if first.strip() else []
        except orjson.JSONDecodeError:
            documents = None
        if documents is None:
            # Not one JSON value per line: a pretty-printed document, read as a whole.
            rest = first + stream.read()
            try:
                document = orjson.loads(rest)
            except orjson.JSONDecodeError as exc:
                raise PermanentError(
                    f"{name}: neither JSON Lines nor a JSON document: {exc}"
                ) from exc
            yield Chunk(items=_items_of(document), malformed=0, position=len(rest))
            return
        items = [item for doc in documents for item in _items_of(doc)]
        malformed, position, line_number = 0, len(first), 1
        for line in stream:
            line_number += 1
            position += len(line)
            if not line.strip():
                continue
            try:
                items.extend(_items_of(orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                log.warning("%s:%d: not a JSON audit event, skipped: %s", name, line_number, exc)
                malformed += 1
            if len(items) >= CHUNK_LINES:
                yield Chunk(items=items, malformed=malformed, position=position)
                items, malformed = [], 0
        yield Chunk(items=items, malformed=malformed, position=position)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def size_of(name: str) -> int | None:
    if name == "-":
        return None
    try:
        return Path(name).stat().st_size
    except OSError:
        return None
