"""The durable journal: accepted audit events survive a crash between the 200 and the commit.

Layout under ``<state-dir>/journal/``: append-only segment files ``<first seq>.wal`` and a
``checkpoint.json`` replaced atomically. A record is::

    u32 payload length | u32 crc32(seq + payload) | u64 seq | payload
    payload = u16 id length | u16 cluster length | auditID | cluster | event JSON

Appends are group-committed: every request that appends while a write + fsync is under way
waits for the next one, so concurrent batches share one fsync. Sequence numbers are given
out in the caller's order before anything is written, so the intake processes records in
exactly that order.

A record is *done* once its changes are in the local Git repository. The checkpoint holds
the highest seq below which everything is done, and opaque per-writer positions (``tips``)
the runtime uses to find commits made after it. Segments wholly below the checkpoint are
kept for ``retain_s`` (their auditIDs keep a retried batch from committing twice across a
restart) and then deleted. A torn record at the end of a segment was never acknowledged
(its fsync never returned) and is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from audit_reverser.errors import PermanentError, TemporaryError

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIQ")
_PAYLOAD_HEADER = struct.Struct("<HH")
_SEQ = struct.Struct("<Q")
SEGMENT_SUFFIX = ".wal"
CHECKPOINT = "checkpoint.json"

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_RETAIN_S = 600.0
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024


class JournalUnavailable(TemporaryError):
    """The journal cannot store more now (disk full, I/O error); the sender should retry."""


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    audit_id: str
    cluster: str
    event: bytes


@dataclass(kw_only=True, slots=True)
class Recovery:
    """What a previous run left: records to process again, and auditIDs already handled."""

    done_seq: int = 0
    # None when there was no checkpoint to read: then no writer position is known.
    tips: dict[str, str | None] | None = None
    pending: list[Record] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)


class SegmentFile:
    """The journal's only contact with the disk; tests replace it to fail like a full disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self.size = size

    def close(self) -> None:
        os.close(self._fd)


def encode(seq: int, audit_id: str, cluster: str, event: bytes) -> bytes:
    ident, name = audit_id.encode(), cluster.encode()
    payload = _PAYLOAD_HEADER.pack(len(ident), len(name)) + ident + name + event
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return _HEADER.pack(len(payload), crc, seq) + payload


def read_segment(path: Path) -> tuple[list[Record], bool]:
    """The whole records of a segment, and whether it ended cleanly (no torn or bad tail)."""
    data = path.read_bytes()
    records: list[Record] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc, seq = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            return records, False
        id_length, cluster_length = _PAYLOAD_HEADER.unpack_from(payload)
        cursor = _PAYLOAD_HEADER.size
        audit_id = payload[cursor : cursor + id_length].decode()
        cursor += id_length
        cluster = payload[cursor : cursor + cluster_length].decode()
        records.append(Record(seq, audit_id, cluster, payload[cursor + cluster_length :]))
        offset = start + length
    return records, offset == len(data)


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    last_seq: int
    closed_at: float | None = None


class Journal:
    def __init__(
        self,
        directory: Path,
        *,
        open_segment: Callable[[Path], SegmentFile] = SegmentFile,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retain_s: float = DEFAULT_RETAIN_S,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    ) -> None:
        self.directory = directory
        self._open_segment = open_segment
        self.segment_bytes = segment_bytes
        self.retain_s = retain_s
        self.min_free_bytes = min_free_bytes
        self._disk_problem: str | None = None
        # One thread for all journal I/O: writes, fsyncs, checkpoints and deletions are
        # ordered, and never queue behind Git work in the default executor.
        self._io = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._segments: list[_Segment] = []
        self._file: SegmentFile | None = None
        self._next_seq = 1
        self._done_seq = 0
        self._done_early: dict[int, dict[str, str | None]] = {}
        self._tips: dict[str, str | None] = {}
        self._saved: tuple[int, dict[str, str | None]] | None = None
        self._buffer: list[bytes] = []
        self._buffer_seqs: list[int] = []
        self._waiting: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.broken: str | None = None
        self.fsyncs = 0

    # -- start-up (blocking, run in a thread) ----------------------------------------------

    def recover(self) -> Recovery:
        """Read what earlier runs left and open a fresh segment for this one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        recovery = Recovery()
        checkpoint = self.directory / CHECKPOINT
        if checkpoint.exists():
            try:
                saved = orjson.loads(checkpoint.read_bytes())
                recovery.done_seq = int(saved["done"])
                recovery.tips = dict(saved["tips"])
            except (ValueError, KeyError, TypeError) as exc:
                raise PermanentError(
                    f"journal checkpoint {checkpoint} is unreadable ({exc}); moving it away "
                    "processes the whole journal again, without duplicate commits"
                ) from exc
        last_seq = recovery.done_seq
        for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
            records, clean = read_segment(path)
            if not clean:
                log.warning("journal %s: ignoring a torn record at its end", path.name)
            first = int(path.stem)
            last = records[-1].seq if records else first - 1
            self._segments.append(_Segment(path, first, last, closed_at=path.stat().st_mtime))
            for record in records:
                if record.seq > recovery.done_seq:
                    recovery.pending.append(record)
                else:
                    recovery.handled.append(record.audit_id)
            last_seq = max(last_seq, last)
        self._next_seq = last_seq + 1
        self._done_seq = recovery.done_seq
        self._tips = dict(recovery.tips or {})
        self._saved = (recovery.done_seq, dict(self._tips))
        # Seqs that never reached the disk (a failed write, a torn tail) are gaps: done.
        pending = {record.seq for record in recovery.pending}
        for seq in range(recovery.done_seq + 1, self._next_seq):
            if seq not in pending:
                self.done(seq)
        self._open_new_segment(self._next_seq)
        if recovery.pending:
            log.info(
                "journal: %d accepted events were not yet committed; processing them again",
                len(recovery.pending),
            )
        return recovery

    def _open_new_segment(self, first_seq: int) -> None:
        path = self.directory / f"{first_seq:020d}{SEGMENT_SUFFIX}"
        self._file = self._open_segment(path)
        self._segments.append(_Segment(path, first_seq, first_seq - 1))
        _sync_directory(self.directory)

    # -- appends (event loop) ----------------------------------------------------------------

    @property
    def unwritable(self) -> str | None:
        """Why an append would fail, as last seen by :meth:`look_at_disk`, or None."""
        return self.broken or self._disk_problem

    async def look_at_disk(self) -> None:
        """See, without writing, whether appends can work: a folder we may not write to (a
        read-only volume) or less free space than the reserve makes :attr:`unwritable` say
        so until it is mended. Runs in the journal's I/O thread, so that readiness checks
        never touch the disk."""
        loop = asyncio.get_running_loop()
        self._disk_problem = await loop.run_in_executor(self._io, self._disk_state)

    def _disk_state(self) -> str | None:
        if not os.access(self.directory, os.W_OK):
            return f"{self.directory} is not writable"
        free = self._into_reserve(0)
        if free is not None:
            return f"{free} bytes free in {self.directory}, below the reserve {self.min_free_bytes}"
        return None

    def _into_reserve(self, adding: int) -> int | None:
        """The free bytes when ``adding`` more would cut into the reserve, else None."""
        free = _free_bytes(self.directory)
        return free if free is not None and free - adding < self.min_free_bytes else None

    @property
    def backlog(self) -> int:
        """Accepted records not yet done."""
        return self._next_seq - 1 - self._done_seq

    def append(
        self, entries: Sequence[tuple[str, str, bytes]]
    ) -> tuple[list[int], asyncio.Future[None]]:
        """Give ``(auditID, cluster, event JSON)`` entries their seqs and queue them for the
        next fsync; the future resolves when they are on disk (or fails with
        :class:`JournalUnavailable`). Callers must await it through ``asyncio.shield``."""
        if self.broken is not None:
            raise JournalUnavailable(self.broken)
        seqs = []
        for audit_id, cluster, event in entries:
            seq = self._next_seq
            self._next_seq += 1
            self._buffer.append(encode(seq, audit_id, cluster, event))
            self._buffer_seqs.append(seq)
            seqs.append(seq)
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_future()
        waiting = self._waiting
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="journal-flush")
        return seqs, waiting

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._buffer:
            data, seqs, waiting = b"".join(self._buffer), self._buffer_seqs, self._waiting
            self._buffer, self._buffer_seqs, self._waiting = [], [], None
            assert waiting is not None
            try:
                await loop.run_in_executor(self._io, self._write, data, seqs[-1])
            except OSError as exc:
                for seq in seqs:  # never stored: nothing to process, nothing to wait for
                    self.done(seq)
                reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
                waiting.set_exception(JournalUnavailable(f"journal cannot store events: {reason}"))
                # Mark it retrieved: every waiter still sees it, and a flush nobody waits
                # for any more (the client went away) is not reported as a lost error.
                waiting.exception()
            else:
                self.fsyncs += 1
                waiting.set_result(None)

    def _write(self, data: bytes, last_seq: int) -> None:
        assert self._file is not None
        if self._into_reserve(len(data)) is not None:
            raise OSError(errno.ENOSPC, "less than the reserved free space left")
        size = self._file.size
        try:
            self._file.write(data)
            self._file.sync()
        except OSError:
            # Leave no partial record behind for the next append to follow.
            try:
                self._file.truncate(size)
            except OSError as exc:
                self.broken = f"journal segment {self._file.path} is damaged: {exc.strerror}"
                log.critical("%s", self.broken)
            raise
        self._segments[-1].last_seq = last_seq
        if self._file.size >= self.segment_bytes:
            # The records are stored: a failure here must not fail their request.
            try:
                self._rotate(last_seq + 1)
            except OSError as exc:
                log.error("journal: cannot start a new segment (%s); appending on", exc.strerror)

    def _rotate(self, first_seq: int) -> None:
        path = self.directory / f"{first_seq:020d}{SEGMENT_SUFFIX}"
        new = self._open_segment(path)
        assert self._file is not None
        self._file.close()
        self._segments[-1].closed_at = time.time()
        self._file = new
        self._segments.append(_Segment(path, first_seq, first_seq - 1))
        _sync_directory(self.directory)

    # -- progress ----------------------------------------------------------------------------

    def done(self, seq: int, tips: dict[str, str | None] | None = None) -> None:
        """Record ``seq`` as committed locally; ``tips`` are the writer positions it reached."""
        if seq <= self._done_seq:
            return
        self._done_early[seq] = tips or {}
        while self._done_seq + 1 in self._done_early:
            self._done_seq += 1
            self._tips.update(self._done_early.pop(self._done_seq))

    def set_tips(self, tips: dict[str, str | None]) -> None:
        """Positions of writers that no pending record has touched (new writers at start)."""
        self._tips.update(tips)

    async def checkpoint(self) -> None:
        """Save progress when it moved, and drop segments no longer needed."""
        state = (self._done_seq, dict(self._tips))
        if state == self._saved:
            return
        await asyncio.get_running_loop().run_in_executor(self._io, self._save, *state)
        self._saved = state

    def _save(self, done_seq: int, tips: dict[str, str | None]) -> None:
        path = self.directory / CHECKPOINT
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as out:
            out.write(orjson.dumps({"done": done_seq, "tips": tips}))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        _sync_directory(self.directory)
        horizon = time.time() - self.retain_s
        keep = []
        for segment in self._segments:
            closed = segment.closed_at
            if closed is not None and segment.last_seq <= done_seq and closed < horizon:
                with contextlib.suppress(FileNotFoundError):
                    segment.path.unlink()
                log.debug("journal: removed %s", segment.path.name)
            else:
                keep.append(segment)
        self._segments = keep

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        await self.checkpoint()
        if self._file is not None:
            await asyncio.get_running_loop().run_in_executor(self._io, self._file.close)
            self._file = None
        self._io.shutdown(wait=False)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
