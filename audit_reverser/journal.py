"""The durable journal: accepted audit events survive a crash between the 200 and the commit,
and wait on disk, not in memory, while Git falls behind.

Layout under ``<state-dir>/journal/``: append-only segment files ``<first seq>.wal`` and a
``checkpoint.json`` replaced atomically. A record is::

    u32 payload length | u32 crc32(seq + payload) | u64 seq | payload
    payload = u16 id length | u16 cluster length | auditID | cluster | event JSON

Appends are group-committed: every request that appends while a write + fsync is under way
waits for the next one, so concurrent batches share one fsync. Sequence numbers are given
out in the caller's order before anything is written.

The intake reads the records back from the segment files in seq order (:meth:`Journal.read`,
a bounded window at a time, in a reader thread of its own), so a backlog of any size costs
disk, not memory; a start after a crash needs only positions, never the records themselves.

A record is *done* once its changes are in the local Git repository. The checkpoint holds
the highest seq below which everything is done, and opaque per-writer positions (``tips``)
the runtime uses to find commits made after it. Segments wholly below the checkpoint are
kept for ``retain_s`` (their auditIDs keep a retried batch from committing twice across a
restart) and then deleted. A torn record at the end of a segment was never acknowledged
(its fsync never returned) and is ignored.

What the intake needs of a journal is :class:`EventJournal`: ``append`` (durable when it
returns), ``read`` (the next records in seq order, waiting for some), ``done`` and the
counters ``backlog`` and ``last_seq``. A second implementation (a shared journal for several
replicas) satisfies the same protocol; recovery, checkpoints and readiness stay with the
runtime, which knows the concrete class.
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
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import orjson

from audit_reverser.errors import PermanentError, TemporaryError
from audit_reverser.files import sync_directory

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIQ")
_PAYLOAD_HEADER = struct.Struct("<HH")
_SEQ = struct.Struct("<Q")
SEGMENT_SUFFIX = ".wal"
CHECKPOINT = "checkpoint.json"

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_RETAIN_S = 600.0
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024
# One read from a segment file; a record longer than this is read whole on its own.
READ_BYTES = 1024 * 1024
# AuditIDs of done records read back on start: as many as the processor remembers.
HANDLED_LIMIT = 100_000

# (auditID, cluster, event JSON): what the intake appends.
Entry = tuple[str, str, bytes]


class JournalUnavailable(TemporaryError):
    """The journal cannot store more now (disk full, I/O error); the sender should retry."""


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    # The event's key (events.EventKey: its Audit-ID and when it was received), by which
    # an event sent again is known.
    audit_id: str
    cluster: str
    event: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch:
    """Records in seq order, and ``through``: every seq up to it has now been read or will
    never be (its write failed, so its sender got a 503)."""

    records: list[Record]
    through: int


class EventJournal(Protocol):
    """What the intake needs of a journal; see the module's docstring."""

    @property
    def backlog(self) -> int:
        """Records appended and not yet done: what waits for Git."""
        ...

    @property
    def last_seq(self) -> int:
        """The newest seq given out by :meth:`append`, or of a record left by an earlier run
        that this one is to finish: what the intake drains through at a stop."""
        ...

    async def append(self, entries: Sequence[Entry]) -> list[int]:
        """Store the entries; returns their seqs once they are durable. Raises
        :class:`JournalUnavailable` when they could not be stored (nothing was, then)."""
        ...

    async def read(self, limit: int, max_bytes: int) -> Batch:
        """The next stored records after the last read (at most ``limit``, and no more event
        bytes than ``max_bytes`` unless one record alone is larger); waits for some."""
        ...

    def done(
        self,
        seq: int,
        tips: dict[str, str | None] | None = None,
        reached: Collection[str] | None = None,
    ) -> None:
        """``seq``'s changes are committed locally; ``tips`` are the writer positions;
        ``reached``: the writers its changes went to, committed or found unchanged (None:
        not known, so any writer)."""
        ...


@dataclass(kw_only=True, slots=True)
class Recovery:
    """What a previous run left: how many records to process again, and auditIDs already
    handled (the newest :data:`HANDLED_LIMIT`)."""

    done_seq: int = 0
    # None when there was no checkpoint to read: then no writer position is known.
    tips: dict[str, str | None] | None = None
    pending: int = 0
    handled: deque[str] = field(default_factory=lambda: deque(maxlen=HANDLED_LIMIT))


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


def _records(data: bytes, base: int = 0) -> Iterator[tuple[Record, int, int]]:
    """Whole, intact records in ``data`` with the offsets (``base`` + position) where each
    starts and ends; stops at a torn or damaged one."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc, seq = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            return
        id_length, cluster_length = _PAYLOAD_HEADER.unpack_from(payload)
        cursor = _PAYLOAD_HEADER.size
        audit_id = payload[cursor : cursor + id_length].decode()
        cursor += id_length
        cluster = payload[cursor : cursor + cluster_length].decode()
        record = Record(seq, audit_id, cluster, payload[cursor + cluster_length :])
        yield record, base + offset, base + start + length
        offset = start + length


def read_segment(path: Path) -> tuple[list[Record], bool]:
    """The whole records of a segment, and whether it ended cleanly (no torn or bad tail)."""
    data = path.read_bytes()
    records, end = [], 0
    for record, _, after in _records(data):
        records.append(record)
        end = after
    return records, end == len(data)


def _read_records(
    path: Path, offset: int, end: int, limit: int, max_bytes: int
) -> tuple[list[Record], int]:
    """Up to ``limit`` records of ``path`` between ``offset`` and ``end`` (both on record
    boundaries), and the offset after the last one returned."""
    with open(path, "rb", buffering=0) as segment:
        data = os.pread(segment.fileno(), min(end - offset, READ_BYTES), offset)
        if len(data) >= _HEADER.size:
            (length,) = struct.unpack_from("<I", data)
            if _HEADER.size + length > len(data):  # one record longer than a read
                data = os.pread(segment.fileno(), _HEADER.size + length, offset)
    records: list[Record] = []
    size, after = 0, offset
    for record, _, position in _records(data, offset):
        if records and size + len(record.event) > max_bytes:
            break
        records.append(record)
        size += len(record.event)
        after = position
        if len(records) >= limit:
            break
    if not records and offset < end:
        # Only the CRC of a record we wrote and fsynced could fail here: the disk lies.
        raise PermanentError(f"journal segment {path} is damaged at offset {offset}")
    return records, after


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    last_seq: int
    # Bytes of whole, fsynced records: readers never look past it.
    stored: int = 0
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
        before_checkpoint: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before_checkpoint``: saves what records leave behind besides commits (who asked
        for a deletion); awaited by every checkpoint before it says more records are done."""
        self.directory = directory
        self._before_checkpoint = before_checkpoint
        self._open_segment = open_segment
        self.segment_bytes = segment_bytes
        self.retain_s = retain_s
        self.min_free_bytes = min_free_bytes
        self._disk_problem: str | None = None
        # One thread for all journal writes: writes, fsyncs, checkpoints and deletions are
        # ordered, and never queue behind Git work in the default executor. Reads have a
        # thread of their own, so that reading a backlog never delays an acknowledgement.
        self._io = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="journal-read")
        # Segment bookkeeping changes on the event loop only (after recover()).
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
        # Every seq up to this one is stored or failed (flushes finish in seq order).
        self._settled_seq = 0
        self._stored_event: asyncio.Event | None = None
        # Where read() goes on: a segment and a byte offset in it.
        self._cursor: tuple[_Segment, int] | None = None
        self._read_through = 0
        self._reported = 0  # the last Batch.through returned
        self.broken: str | None = None
        self.fsyncs = 0

    # -- start-up (blocking, run in a thread) ----------------------------------------------

    def recover(self) -> Recovery:
        """Find what earlier runs left (positions only: nothing is held in memory but the
        auditIDs of done records) and open a fresh segment for this run."""
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
        self._done_seq = recovery.done_seq
        self._tips = dict(recovery.tips or {})
        self._saved = (recovery.done_seq, dict(self._tips))
        expected = recovery.done_seq + 1  # the next seq a pending record should have
        for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
            segment = _Segment(path, int(path.stem), int(path.stem) - 1)
            segment.closed_at = path.stat().st_mtime
            data = path.read_bytes()
            for record, start, end in _records(data):
                segment.last_seq, segment.stored = record.seq, end
                if record.seq <= recovery.done_seq:
                    recovery.handled.append(record.audit_id)
                    continue
                if self._cursor is None:
                    self._cursor = (segment, start)
                # Seqs that never reached the disk (a failed write) are gaps: done.
                for gap in range(expected, record.seq):
                    self.done(gap)
                expected = record.seq + 1
                recovery.pending += 1
            if segment.stored != len(data):
                log.warning("journal %s: ignoring a torn record at its end", path.name)
            del data
            self._segments.append(segment)
        last_seq = max([recovery.done_seq, *(s.last_seq for s in self._segments)])
        for gap in range(expected, last_seq + 1):
            self.done(gap)
        self._next_seq = last_seq + 1
        self._settled_seq = last_seq
        self._read_through = recovery.done_seq if self._cursor is not None else last_seq
        self._open_new_segment(self._next_seq)
        if self._cursor is None:
            self._cursor = (self._segments[-1], self._segments[-1].stored)
        if recovery.pending:
            log.info(
                "journal: %d accepted events were not yet committed; processing them again",
                recovery.pending,
            )
        return recovery

    def _open_new_segment(self, first_seq: int) -> None:
        path = self.directory / f"{first_seq:020d}{SEGMENT_SUFFIX}"
        # An earlier run that stored nothing left this very file, empty: it is ours now, and
        # must not be deleted as that run's closed segment.
        self._segments = [s for s in self._segments if s.path != path]
        self._file = self._open_segment(path)
        self._segments.append(_Segment(path, first_seq, first_seq - 1, stored=self._file.size))
        sync_directory(self.directory)

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

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    async def append(self, entries: Sequence[Entry]) -> list[int]:
        """Give ``(auditID, cluster, event JSON)`` entries their seqs and store them with the
        next fsync; returns the seqs once they are on disk, or raises
        :class:`JournalUnavailable`. A caller cancelled meanwhile (its client went away)
        does not cancel the fsync others wait for."""
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
        await asyncio.shield(waiting)
        return seqs

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._buffer:
            data, seqs, waiting = b"".join(self._buffer), self._buffer_seqs, self._waiting
            self._buffer, self._buffer_seqs, self._waiting = [], [], None
            assert waiting is not None
            try:
                size, rotated = await loop.run_in_executor(self._io, self._write, data, seqs[-1])
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
                segment = self._segments[-1]
                segment.last_seq, segment.stored = seqs[-1], size
                if rotated is not None:
                    segment.closed_at = time.time()
                    self._segments.append(_Segment(rotated, seqs[-1] + 1, seqs[-1]))
                waiting.set_result(None)
            self._settled_seq = seqs[-1]
            if self._stored_event is not None:
                self._stored_event.set()

    def _write(self, data: bytes, last_seq: int) -> tuple[int, Path | None]:
        """Write and fsync; returns the segment's stored size, and the path of the segment
        started after it when it reached its size."""
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
        stored = self._file.size
        if stored < self.segment_bytes:
            return stored, None
        # The records are stored: a failure here must not fail their request.
        try:
            return stored, self._rotate(last_seq + 1)
        except OSError as exc:
            log.error("journal: cannot start a new segment (%s); appending on", exc.strerror)
            return stored, None

    def _rotate(self, first_seq: int) -> Path:
        path = self.directory / f"{first_seq:020d}{SEGMENT_SUFFIX}"
        new = self._open_segment(path)
        assert self._file is not None
        self._file.close()
        self._file = new
        sync_directory(self.directory)
        return path

    # -- reading back (event loop) -----------------------------------------------------------

    async def read(self, limit: int, max_bytes: int) -> Batch:
        """The next stored records in seq order; waits until there are some (or until a
        failed write moved :attr:`Batch.through` on)."""
        loop = asyncio.get_running_loop()
        while True:
            assert self._cursor is not None, "recover() first"
            segment, offset = self._cursor
            last = segment is self._segments[-1]
            end, settled = segment.stored, self._settled_seq
            if offset < end:
                records, offset = await loop.run_in_executor(
                    self._reader, _read_records, segment.path, offset, end, limit, max_bytes
                )
                self._cursor = (segment, offset)
                through = records[-1].seq
                if last and offset == end:
                    through = max(through, settled)
                self._read_through = self._reported = max(self._read_through, through)
                return Batch(records=records, through=self._read_through)
            following = self._following(segment)
            if following is not None:
                self._cursor = (following, 0)
                continue
            # Seqs of a failed write will never be read; nor, on start, those done before.
            self._read_through = max(self._read_through, settled)
            if self._read_through > self._reported:
                self._reported = self._read_through
                return Batch(records=[], through=self._read_through)
            if self._stored_event is None:
                self._stored_event = asyncio.Event()
            self._stored_event.clear()
            await self._stored_event.wait()

    def _following(self, segment: _Segment) -> _Segment | None:
        """The segment after ``segment``, which may have been deleted since it was read."""
        return next((s for s in self._segments if s.first_seq > segment.first_seq), None)

    # -- progress ----------------------------------------------------------------------------

    def done(
        self,
        seq: int,
        tips: dict[str, str | None] | None = None,
        reached: Collection[str] | None = None,
    ) -> None:
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
        # After the state is taken: what it counts as done left its trace before it.
        if self._before_checkpoint is not None:
            await self._before_checkpoint()
        if state == self._saved:
            return
        horizon = time.time() - self.retain_s
        doomed = [
            s
            for s in self._segments
            if s.closed_at is not None and s.last_seq <= state[0] and s.closed_at < horizon
        ]
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._save, *state, [s.path for s in doomed]
        )
        self._saved = state
        self._segments = [s for s in self._segments if s not in doomed]

    def _save(self, done_seq: int, tips: dict[str, str | None], doomed: list[Path]) -> None:
        path = self.directory / CHECKPOINT
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as out:
            out.write(orjson.dumps({"done": done_seq, "tips": tips}))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        sync_directory(self.directory)
        for segment in doomed:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
            log.debug("journal: removed %s", segment.name)

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        await self.checkpoint()
        if self._file is not None:
            await asyncio.get_running_loop().run_in_executor(self._io, self._file.close)
            self._file = None
        self._io.shutdown(wait=False)
        self._reader.shutdown(wait=False)


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
