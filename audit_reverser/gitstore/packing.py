"""Git objects made in memory and written as one pack file per batch.

libgit2 writes each new object as a loose file and re-scans the object directory around
every write (about a millisecond and twenty system calls per object, with the GIL held). A
single-file commit makes a blob, one tree per directory level and a commit, so a commit
loop through libgit2 spends nearly all its time there. Here the writer hashes its objects
itself, keeps them in memory until the batch ends and then writes them as one pack (with an
index) into the mirror, where libgit2 and git read them like any other pack.

Trees rewritten again and again in one batch (the directory of a busy namespace) are stored
as deltas against their previous version: the copy/insert instructions are known from the
common prefix and suffix of the two versions, so no delta search is needed. A big tree is
handed over in runs of entries, never joined (:meth:`NewObjects.add_chunks`): runs it shares
with its previous version are copied, and only the changed ones compared (:func:`chunked_delta`).
Where a chain would grow past git's depth, a big tree is stored as a delta against the batch's
first version of it instead (instructions :mod:`.trees` derives from the entries that
changed), not written out whole again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import operator
import os
import struct
import sys
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from audit_reverser.files import sync_directory

COMMIT, TREE, BLOB = 1, 2, 3
_OFS_DELTA = 6
_TYPE_NAMES = {COMMIT: b"commit", TREE: b"tree", BLOB: b"blob"}

# git's default; a longer chain makes every read of the newest version slower.
MAX_DELTA_DEPTH = 50
# Below this a delta saves little and costs a second object read.
MIN_DELTA_SIZE = 512
_MAX_COPY = 0xFFFFFF

ObjectReader = Callable[[bytes], tuple[int, bytes]]


def object_id(kind: int, data: bytes) -> bytes:
    """The (SHA-1) object id, as 20 raw bytes."""
    return chunks_id(kind, (data,), len(data))


def chunks_id(kind: int, chunks: Iterable[bytes], size: int) -> bytes:
    """The object id of the concatenation of ``chunks`` (``size`` bytes), not joined."""
    digest = hashlib.sha1(b"%s %d\0" % (_TYPE_NAMES[kind], size), usedforsecurity=False)
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


@dataclass(slots=True)
class _Pending:
    kind: int
    # None once a later version was made from this one: a batch of commits to a folder of
    # 40,000 files would otherwise hold 256 versions of its 2 MB tree.
    data: bytes | None
    base: bytes | None  # the object this one is stored as a delta of
    depth: int
    delta: bytes | None = None  # the delta from ``base``


class NewObjects:
    """Objects made since the last :meth:`write_pack`, readable before they are written.

    Each object's pack entry is encoded (compressed) as the object comes, not all at the
    save: a save under a steady trickle of writes used to hold the GIL for milliseconds of
    compression at once, and the requests it overlapped were the slowest ones."""

    def __init__(self, read_stored: ObjectReader) -> None:
        self._read_stored = read_stored
        self._pending: dict[bytes, _Pending] = {}
        self._entries = bytearray()  # the pack after its header, up to the checksum
        self._offsets: dict[bytes, int] = {}  # in the pack, the header counted
        self._crcs: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, kind: int, data: bytes, *, delta_of: bytes | None = None) -> bytes:
        """Store an object (as a delta of ``delta_of`` where that pays) and return its id."""
        oid = object_id(kind, data)
        if oid in self._pending:
            return oid
        base, depth, delta = None, 0, None
        if delta_of is not None and len(data) >= MIN_DELTA_SIZE:
            previous = self._pending.get(delta_of)
            if previous is not None and previous.depth < MAX_DELTA_DEPTH:
                base, depth = delta_of, previous.depth + 1
                delta = make_delta(self.read(delta_of)[1], data)
                if previous.delta is not None:
                    previous.data = None  # read() rebuilds it from its base
        self._pending[oid] = _Pending(kind, data, base, depth, delta)
        self._encode(oid, kind, data if delta is None else delta, base)
        return oid

    def add_chunks(
        self, kind: int, chunks: Sequence[bytes], size: int, *, base: bytes, delta: bytes
    ) -> bytes:
        """Store the concatenation of ``chunks`` (``size`` bytes) as ``delta`` of ``base``, a
        pending object, and return its id. Keeps no joined copy: a folder of 80,000 files
        has a 4 MB tree, and each commit to it would allocate and free one (:meth:`read`
        rebuilds it from its base when asked)."""
        oid = chunks_id(kind, chunks, size)
        if oid not in self._pending:
            previous = self._pending[base]
            if previous.delta is not None:
                previous.data = None
            self._pending[oid] = _Pending(kind, None, base, previous.depth + 1, delta)
            self._encode(oid, kind, delta, base)
        return oid

    def _encode(self, oid: bytes, kind: int, stored: bytes, base: bytes | None) -> None:
        """Append the pack entry of ``oid``: ``stored`` is its data, or its delta from
        ``base`` (an entry before it, as git's OFS_DELTA needs)."""
        start = _PACK_HEADER + len(self._entries)
        if base is None:
            head: bytes | bytearray = _entry_header(kind, len(stored))
        else:
            head = _entry_header(_OFS_DELTA, len(stored)) + _offset_encoding(
                start - self._offsets[base]
            )
        record = head + _compress(stored, _LEVELS[kind])
        self._offsets[oid] = start
        self._crcs[oid] = zlib.crc32(record)
        self._entries += record

    def depth(self, oid: bytes) -> int | None:
        """The delta depth of a pending object (0: stored whole); None when not pending."""
        pending = self._pending.get(oid)
        return pending.depth if pending is not None else None

    def is_new(self, oid: bytes) -> bool:
        return oid in self._pending

    def read(self, oid: bytes) -> tuple[int, bytes]:
        pending = self._pending.get(oid)
        if pending is None:
            return self._read_stored(oid)
        if pending.data is not None:
            return pending.kind, pending.data
        assert pending.base is not None and pending.delta is not None
        return pending.kind, apply_delta(self.read(pending.base)[1], pending.delta)

    def discard(self) -> None:
        self._pending.clear()
        self._entries = bytearray()
        self._offsets.clear()
        self._crcs.clear()

    def write_pack(self, pack_dir: Path) -> Path | None:
        """Write the pending objects as ``pack-<sha>.pack`` + ``.idx`` (both synced to disk,
        the index last, so that a reader never sees a pack without its objects)."""
        if not self._pending:
            return None
        header = b"PACK" + struct.pack(">II", 2, len(self._pending))
        digest = hashlib.sha1(header, usedforsecurity=False)
        digest.update(self._entries)
        checksum = digest.digest()
        index = _encode_index(self._offsets, self._crcs, checksum)
        pack_path = _install_pack(pack_dir, (header, self._entries, checksum), index)
        self.discard()
        return pack_path


def _install_pack(pack_dir: Path, parts: Sequence[bytes | bytearray], index: bytes) -> Path:
    """Put a pack (written from ``parts``, its checksum last) and its index into
    ``pack_dir``, durably, the index last."""
    pack_dir.mkdir(parents=True, exist_ok=True)
    name = f"pack-{parts[-1].hex()}"
    pack_path = pack_dir / f"{name}.pack"
    with _durable(pack_dir / f"tmp_{name}.pack", pack_path) as out:
        for part in parts:
            out.write(part)
    with _durable(pack_dir / f"tmp_{name}.idx", pack_dir / f"{name}.idx") as out:
        out.write(index)
    sync_directory(pack_dir)
    return pack_path


@contextlib.contextmanager
def _durable(temporary: Path, final: Path | None = None) -> Iterator[BinaryIO]:
    """A file written at ``temporary``, synced and made read-only (packs are immutable; git
    makes them read-only too) when the block ends, then renamed to ``final`` if given."""
    temporary.unlink(missing_ok=True)  # read-only, left by a crash
    with open(temporary, "wb") as out:
        yield out
        out.flush()
        os.fdatasync(out.fileno())
    temporary.chmod(0o444)
    if final is not None:
        temporary.replace(final)


# -- merging packs ---------------------------------------------------------------------------


_ID = struct.Struct("20s")
_FIRST = operator.itemgetter(0)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Table:
    """A version 2 pack index as compact arrays, in its (id) order: 32 bytes per object
    instead of the 300 or so of Python lists and dicts (tens of MiB in a big merge)."""

    ids: bytes  # 20 bytes per object, sorted
    offsets: array[int]  # in the pack
    crcs: array[int]

    @property
    def count(self) -> int:
        return len(self.offsets)

    def ids_between(self, low: int, high: int) -> Iterator[bytes]:
        """The ids of objects ``low`` to ``high`` - 1, cut by C code as they are read."""
        return map(_FIRST, _ID.iter_unpack(memoryview(self.ids)[20 * low : 20 * high]))

    def first_byte_bounds(self) -> list[int]:
        """Where the ids of each first byte start, and the count at the end."""
        return [0, *_fanout(self.ids[::20])]


def _to_big_endian(values: array[int]) -> bytes:
    if sys.byteorder == "little":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _from_big_endian(kind: str, data: bytes) -> array[int]:
    values = array(kind, data)
    if sys.byteorder == "little":
        values.byteswap()
    return values


def read_index(source: BinaryIO) -> _Table:
    """The object ids of a version 2 pack index with their offsets in the pack and CRCs,
    read a section at a time (the file whole would be another 28 bytes per object)."""
    header = source.read(8 + 256 * 4)
    if not header.startswith(b"\xfftOc\0\0\0\2") or len(header) < 8 + 256 * 4:
        raise ValueError("not a version 2 pack index")
    count = int.from_bytes(header[-4:], "big")
    ids = source.read(20 * count)
    crcs = _from_big_endian("I", source.read(4 * count))
    small = _from_big_endian("I", source.read(4 * count))
    offsets = array("Q", small)
    if count and max(small) & 0x80000000:
        large = _from_big_endian("Q", source.read()[:-40])
        for i, offset in enumerate(small):
            if offset & 0x80000000:
                offsets[i] = large[offset & 0x7FFFFFFF]
    return _Table(ids=ids, offsets=offsets, crcs=crcs)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Merge:
    """Which objects of the packs being merged go into the new pack: the first copy of each
    id (packs in the order given), and the order of the new pack's index."""

    keep: list[bytearray]  # per pack, per object (index order): 1 for its first copy
    earlier: dict[tuple[int, int], tuple[int, int]]  # a repeated object -> its first copy
    order: array[int]  # the pack of each id of the new index, in id order
    fanout: list[int]  # the new index's fan-out: how many ids start with each byte or less


def _plan(tables: list[_Table]) -> _Merge:
    """Which copy of each id to keep, and the new index's order.

    A range of first bytes of the ids at a time (about :data:`_PLAN_IDS` ids, object ids
    being uniform), the packs' ids are sorted together by C code (a stable sort, which
    finds the packs' own sorted runs and merges them: copies of one id come in pack order)
    and only a range with a repeated id is walked in Python. A heap walk over all ids took
    about 2 µs per object, a sixth of a long drain's Git thread; one first byte at a time,
    a small merge (the few packs of a push) spent 1.4 µs per object in the loop's overhead.
    """
    merge = _Merge(
        keep=[bytearray(b"\1") * t.count for t in tables], earlier={}, order=array("H"), fanout=[]
    )
    bounds = [t.first_byte_bounds() for t in tables]
    ranges = min(256, -(-sum(t.count for t in tables) // _PLAN_IDS)) or 1
    for n in range(ranges):
        _plan_range(merge, tables, bounds, 256 * n // ranges, 256 * (n + 1) // ranges)
    return merge


# Ids sorted together at once by _plan: a bound on its lists (about 70 bytes per id).
_PLAN_IDS = 1 << 14


def _plan_range(
    merge: _Merge, tables: list[_Table], bounds: list[list[int]], low: int, high: int
) -> None:
    """:func:`_plan` for the ids whose first byte is in ``low`` to ``high`` - 1."""
    ids: list[bytes] = []
    owners = array("H")  # the pack of each of ids
    shift = [0] * len(tables)  # an id's index in pack j is its place in ids + shift[j]
    for j, table in enumerate(tables):
        start, end = bounds[j][low], bounds[j][high]
        if start < end:
            shift[j] = start - len(ids)
            ids += table.ids_between(start, end)
            owners += array("H", [j]) * (end - start)
    if not ids:
        merge.fanout.extend([len(merge.order)] * (high - low))
        return
    positions = sorted(range(len(ids)), key=ids.__getitem__)
    kept = list(map(ids.__getitem__, positions))
    if not any(map(operator.eq, kept, itertools.islice(kept, 1, None))):
        # One C call, where extend() would take the owners one at a time (the 0 added
        # makes the getter return a tuple for a single position too).
        merge.order.extend(array("H", operator.itemgetter(*positions, 0)(owners)[:-1]))
    else:
        in_order, kept = kept, []
        previous, first = b"", (0, 0)
        for position, oid in zip(positions, in_order, strict=True):
            j = owners[position]
            i = position + shift[j]
            if oid == previous:  # an earlier pack has it
                merge.keep[j][i] = 0
                merge.earlier[(j, i)] = first
            else:
                previous, first = oid, (j, i)
                merge.order.append(j)
                kept.append(oid)
    before = len(merge.order) - len(kept)
    first_bytes = bytes(map(_FIRST, kept))  # sorted, as the ids are
    merge.fanout.extend(before + count for count in _fanout(first_bytes, low, high))


def merge_packs(packs: list[Path], pack_dir: Path) -> Path:
    """Write one pack into ``pack_dir`` holding the objects of ``packs`` (paths of ``.pack``
    files with their ``.idx``), and return its path; the old packs are left alone.

    Entries are copied as they are stored: deltas stay deltas and nothing is decompressed,
    so the cost is one pass over the bytes, whatever the content. A pack sharing no object
    with those before it is copied whole (its internal offsets stay valid); otherwise its
    entries are copied one by one, repeated objects left out and offset deltas re-pointed.
    The bytes go through a file in chunks, the indexes are held as compact arrays (each
    pack's offsets become the new ones in place) and the new index is written a slice at a
    time: 35 bytes per object in all. Merging the big tiers of a long drain in a busy folder
    (280,000 objects) held 95 MiB of Python lists, dicts and sets of ids at first; 400,000
    objects now peak at 16 MiB.
    """
    if len(packs) >= 1 << 16:
        raise ValueError("too many packs to merge at once")
    pack_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    for path in packs:
        with open(path.with_suffix(".idx"), "rb") as index:
            tables.append(read_index(index))
    merge = _plan(tables)
    temporary = pack_dir / f"tmp_pack-merge-{os.getpid()}.pack"
    with _durable(temporary) as out:
        sink = _HashedFile(out)
        sink.write(b"PACK" + struct.pack(">II", 2, len(merge.order)))
        for j, (path, table) in enumerate(zip(packs, tables, strict=True)):
            with open(path, "rb") as source:
                size = os.fstat(source.fileno()).st_size
                if merge.keep[j].count(0) == 0:
                    shift = sink.size - 12
                    source.seek(12)
                    sink.copy(source, size - 32)
                    table.offsets[:] = array("Q", map(shift.__add__, table.offsets))
                else:
                    _copy_entries(source, size, j, tables, merge, sink)
        checksum = sink.digest()
        out.write(checksum)
    name = f"pack-{checksum.hex()}"
    pack_path = pack_dir / f"{name}.pack"
    temporary.replace(pack_path)
    with _durable(pack_dir / f"tmp_{name}.idx", pack_dir / f"{name}.idx") as out:
        _write_merged_index(_HashedFile(out), tables, merge, checksum)
    sync_directory(pack_dir)
    return pack_path


def _write_merged_index(
    sink: _HashedFile, tables: list[_Table], merge: _Merge, checksum: bytes
) -> None:
    """The new pack's index, written a slice of each column at a time (never whole in
    memory: 36 bytes per object, 14 MiB for a merge of 400,000 objects). Each pack's first
    copies come in its own (id) order, so a column is the packs' columns taken in
    ``merge.order``, by iterators that C code runs."""

    def column(values: Callable[[_Table], Iterable[Any]]) -> Iterator[list[Any]]:
        kept = [
            itertools.compress(values(table), keep)
            for table, keep in zip(tables, merge.keep, strict=True)
        ]
        for start in range(0, len(merge.order), _INDEX_SLICE):
            yield list(map(next, map(kept.__getitem__, merge.order[start : start + _INDEX_SLICE])))

    _write_index(
        sink,
        merge.fanout,
        map(b"".join, column(lambda table: table.ids_between(0, table.count))),
        map(functools.partial(array, "I"), column(operator.attrgetter("crcs"))),
        map(functools.partial(array, "Q"), column(operator.attrgetter("offsets"))),
        checksum,
    )


_INDEX_SLICE = 1 << 14
_CHUNK = 1 << 20


class _HashedFile:
    """A file being written, with the SHA-1 and size of what was written so far."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha1(usedforsecurity=False)
        self.size = 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.size += len(data)

    def copy(self, source: BinaryIO, size: int) -> None:
        """Append the next ``size`` bytes of ``source``, a chunk at a time."""
        while size > 0:
            chunk = source.read(min(size, _CHUNK))
            if not chunk:
                raise ValueError(f"{source.name} is shorter than its index says")
            self.write(chunk)
            size -= len(chunk)

    def digest(self) -> bytes:
        return self._hash.digest()


def _copy_entries(
    source: BinaryIO,
    size: int,
    j: int,
    tables: list[_Table],
    merge: _Merge,
    sink: _HashedFile,
) -> None:
    """Append the first copies among the entries of pack ``j`` (``size`` bytes), by offset,
    with their offset deltas pointed at their base's place in the new pack. The pack's
    table is given the new offsets in place of the old (the earlier packs' tables have
    theirs already); its entries' CRCs change with the entries rewritten."""
    table = tables[j]
    by_offset = array("I", sorted(range(table.count), key=table.offsets.__getitem__))
    starts = array("Q", (table.offsets[i] for i in by_offset))
    keep = merge.keep[j]
    for position, i in enumerate(by_offset):
        if not keep[i]:
            continue
        start = starts[position]
        end = starts[position + 1] if position + 1 < len(starts) else size - 20
        source.seek(start)
        data = source.read(end - start)
        at = 0
        while data[at] & 0x80:  # type and size
            at += 1
        at += 1
        if (data[0] >> 4) & 7 == _OFS_DELTA:
            header = data[:at]
            byte = data[at]
            distance = byte & 0x7F
            at += 1
            while byte & 0x80:
                byte = data[at]
                distance = ((distance + 1) << 7) | (byte & 0x7F)
                at += 1
            # The base, or the copy of it an earlier pack gave, is already in the new pack.
            base = by_offset[bisect_left(starts, start - distance)]
            base_pack, base = merge.earlier.get((j, base), (j, base))
            # A base comes before its deltas in a pack, so its new offset is known.
            data = (
                header + _offset_encoding(sink.size - tables[base_pack].offsets[base]) + data[at:]
            )
            table.crcs[i] = zlib.crc32(data)  # the index lists the entry as rewritten
        table.offsets[i] = sink.size
        sink.write(data)


def _entry_header(kind: int, size: int) -> bytes | bytearray:
    byte = (kind << 4) | (size & 0x0F)
    size >>= 4
    if size < 0x80:  # up to 2 KiB, as nearly every object of a batch: no loop
        return bytes((byte | 0x80, size)) if size else bytes((byte,))
    header = bytearray()
    while size:
        header.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    header.append(byte)
    return header


def _offset_encoding(distance: int) -> bytes:
    """The base-object distance of an OFS_DELTA entry (git's 'offset encoding')."""
    out = bytearray([distance & 0x7F])
    distance >>= 7
    while distance:
        distance -= 1
        out.append(0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(reversed(out))


def _size_varint(size: int) -> bytearray:
    out = bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        if size:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return out


def _common_prefix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``: a binary search
    whose comparisons run in C (a byte loop in Python would cost a hundred times more), on
    views of ``b`` (slices would copy: 4 MB per search in a folder of 80,000 files)."""
    low, high = 0, limit
    view = memoryview(b)
    while low < high:
        middle = (low + high + 1) // 2
        if a.startswith(view[low:middle], low):
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common suffix of ``a`` and ``b``, at most ``limit``."""
    low, high = 0, limit
    end_a, end_b = len(a), len(b)
    view = memoryview(b)
    while low < high:
        middle = (low + high + 1) // 2
        if a.endswith(view[end_b - middle : end_b - low], 0, end_a - low):
            low = middle
        else:
            high = middle - 1
    return low


def _copy(out: bytearray, offset: int, size: int) -> None:
    while size:
        chunk = min(size, _MAX_COPY)
        op, args = 0x80, bytearray()
        for i in range(4):
            byte = (offset >> (8 * i)) & 0xFF
            if byte:
                op |= 1 << i
                args.append(byte)
        for i in range(3):
            byte = (chunk >> (8 * i)) & 0xFF
            if byte:
                op |= 0x10 << i
                args.append(byte)
        out.append(op)
        out += args
        offset += chunk
        size -= chunk


def _insert(out: bytearray, data: bytes) -> None:
    for start in range(0, len(data), 0x7F):
        chunk = data[start : start + 0x7F]
        out.append(len(chunk))
        out += chunk


def chunked_delta(base: Sequence[bytes], target: Sequence[bytes], target_size: int) -> bytes:
    """A git delta turning the concatenation of ``base`` into that of ``target``, where
    the chunks both share are the same objects (a big tree's unchanged runs of entries).
    Those are copied; each stretch of other chunks is compared with the base's stretch in
    the same place, its common prefix and suffix copied and the rest inserted. The cost
    grows with the changed chunks, not with the whole."""
    shared: dict[int, tuple[int, int]] = {}  # id of a base chunk -> (its index, its offset)
    offset = 0
    for index, chunk in enumerate(base):
        shared[id(chunk)] = (index, offset)
        offset += len(chunk)
    ops: list[tuple[int, int] | bytes] = []
    next_index = next_offset = 0  # the base chunk after the last shared one, and its offset
    changed: list[bytes] = []  # target chunks since the last shared one
    for chunk in target:
        found = shared.get(id(chunk))
        if found is None or found[0] < next_index:
            changed.append(chunk)
            continue
        index, at = found
        if changed or index > next_index:  # most runs follow a shared one: nothing between
            _stretch(ops, b"".join(base[next_index:index]), next_offset, b"".join(changed))
        _copy_op(ops, at, len(chunk))
        next_index, next_offset, changed = index + 1, at + len(chunk), []
    _stretch(ops, b"".join(base[next_index:]), next_offset, b"".join(changed))
    return compose_delta(offset, target_size, ops)


def _stretch(ops: list[tuple[int, int] | bytes], old: bytes, at: int, new: bytes) -> None:
    """Ops making ``new`` of ``old``, which starts at ``at`` in the base."""
    limit = min(len(old), len(new))
    prefix = _common_prefix(old, new, limit)
    suffix = _common_suffix(old, new, limit - prefix)
    _copy_op(ops, at, prefix)
    if len(new) - suffix > prefix:
        ops.append(new[prefix : len(new) - suffix])
    _copy_op(ops, at + len(old) - suffix, suffix)


def _copy_op(ops: list[tuple[int, int] | bytes], at: int, size: int) -> None:
    """A copy, merged into the one before when it continues it."""
    if not size:
        return
    if ops and isinstance(last := ops[-1], tuple) and last[0] + last[1] == at:
        ops[-1] = (last[0], last[1] + size)
    else:
        ops.append((at, size))


def compose_delta(base_size: int, target_size: int, ops: list[tuple[int, int] | bytes]) -> bytes:
    """A git delta from its instructions: ``(offset, size)`` copies from the base and
    ``bytes`` inserted."""
    out = _size_varint(base_size) + _size_varint(target_size)
    for op in ops:
        if isinstance(op, bytes):
            _insert(out, op)
        elif op[1]:
            _copy(out, op[0], op[1])
    return bytes(out)


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """The object a git delta makes of ``base``."""
    at = 0
    for _ in range(2):  # the sizes of the base and the result
        while delta[at] & 0x80:
            at += 1
        at += 1
    parts = []
    while at < len(delta):
        op = delta[at]
        at += 1
        if op & 0x80:
            offset = size = 0
            for i in range(7):
                if op & (1 << i):
                    value = delta[at] << (8 * (i if i < 4 else i - 4))
                    at += 1
                    if i < 4:
                        offset |= value
                    else:
                        size |= value
            parts.append(base[offset : offset + (size or 0x10000)])
        else:
            parts.append(delta[at : at + op])
            at += op
    return b"".join(parts)


def make_delta(base: bytes, target: bytes) -> bytes:
    """A git delta turning ``base`` into ``target``: copy the common prefix and suffix,
    insert what lies between."""
    ops: list[tuple[int, int] | bytes] = []
    _stretch(ops, base, 0, target)
    return compose_delta(len(base), len(target), ops)


def _compress(data: bytes, level: int) -> bytes:
    """zlib with a window and hash table sized to the object.

    zlib's defaults allocate about 400 KiB per stream; for the few hundred bytes of a commit
    or a small tree, setting that up costs several times the compression itself.
    """
    if level == 0:
        return _stored(data)
    bits = len(data).bit_length()
    window, memory = min(15, max(9, bits + 1)), min(8, max(1, bits - 4))
    stream = zlib.compressobj(level, zlib.DEFLATED, window, memory)
    return stream.compress(data) + stream.flush()


_STORED_BLOCK = 0xFFFF


def _stored(data: bytes) -> bytes:
    """A zlib stream of ``data`` in stored (uncompressed) deflate blocks, as level 0 writes
    it: zlib's own level 0 took 28 µs for a 7 KB tree, mostly setting up its stream; this
    takes 4 (the header, a 5-byte head per 64 KiB block, the Adler-32)."""
    size = len(data)
    if size <= _STORED_BLOCK:  # one block, as nearly every tree
        head = struct.pack("<BHH", 1, size, size ^ 0xFFFF)
        return b"\x78\x01" + head + data + struct.pack(">I", zlib.adler32(data))
    out = bytearray(b"\x78\x01")  # deflate, 32 KiB window, "fastest"; a multiple of 31
    start = 0
    while True:
        block = data[start : start + _STORED_BLOCK]
        start += len(block)
        final = start >= len(data)
        out += struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF)
        out += block
        if final:
            break
    out += struct.pack(">I", zlib.adler32(data))
    return bytes(out)


# Trees (and their deltas) are stored without compression: most of a tree is object ids,
# which do not compress.
_LEVELS = {COMMIT: 1, TREE: 0, BLOB: 1}
_PACK_HEADER = 12  # "PACK", the version, the number of entries


def _encode_index(offsets: dict[bytes, int], crcs: dict[bytes, int], checksum: bytes) -> bytes:
    """A version 2 pack index of the objects of ``offsets``."""
    oids = sorted(offsets)
    ids = b"".join(oids)
    out = io.BytesIO()
    _write_index(
        _HashedFile(out),
        _fanout(ids[::20]),
        [ids],
        [array("I", map(crcs.__getitem__, oids))],
        [array("Q", map(offsets.__getitem__, oids))],
        checksum,
    )
    return out.getvalue()


def _fanout(first_bytes: bytes, low: int = 0, high: int = 256) -> list[int]:
    """A pack index's fan-out of sorted ids, given by their ``first_bytes``: how many start
    with each byte (from ``low`` to ``high`` - 1) or a smaller one."""
    return [bisect_right(first_bytes, byte) for byte in range(low, high)]


def _write_index(
    sink: _HashedFile,
    fanout: list[int],
    ids: Iterable[bytes],
    crcs: Iterable[array[int]],
    offsets: Iterable[array[int]],
    checksum: bytes,
) -> None:
    """A version 2 pack index from its columns, each given in pieces in id order: fan-out
    table, sorted ids, CRCs, offsets (and the large ones), the pack's checksum, and the
    SHA-1 of all that."""
    sink.write(b"\xfftOc" + struct.pack(">I", 2) + struct.pack(">256I", *fanout))
    for piece in ids:
        sink.write(piece)
    for values in crcs:
        sink.write(_to_big_endian(values))
    large = array("Q")
    for values in offsets:
        sink.write(_to_big_endian(_small_offsets(values, large)))
    sink.write(_to_big_endian(large))
    sink.write(checksum)
    sink.write(sink.digest())


def _small_offsets(offsets: array[int], large: array[int]) -> array[int]:
    """A pack index's 32-bit offsets column for ``offsets``: offsets of 2 GiB or more are
    appended to ``large`` and referred to by their place there (git's format)."""
    if not offsets or max(offsets) < 0x80000000:
        return array("I", offsets)
    small = array("I")
    for offset in offsets:
        if offset >= 0x80000000:
            small.append(0x80000000 | len(large))
            large.append(offset)
        else:
            small.append(offset)
    return small
