"""Git objects made in memory and written as one pack file per batch.

libgit2 writes each new object as a loose file and re-scans the object directory around
every write (about a millisecond and twenty system calls per object, with the GIL held). A
single-file commit makes a blob, one tree per directory level and a commit, so a commit
loop through libgit2 spends nearly all its time there. Here the writer hashes its objects
itself, keeps them in memory until the batch ends and then writes them as one pack (with an
index) into the mirror, where libgit2 and git read them like any other pack.

Trees rewritten again and again in one batch (the directory of a busy namespace) are stored
as deltas against their previous version: the copy/insert instructions are known from the
common prefix and suffix of the two versions, so no delta search is needed. Where that chain
would grow past git's depth, a big tree is stored as a delta against the batch's first
version of it instead (:meth:`NewObjects.add_delta`, with instructions :mod:`.trees` derives
from the entries that changed), not written out whole again.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    digest = hashlib.sha1(b"%s %d\0" % (_TYPE_NAMES[kind], len(data)), usedforsecurity=False)
    digest.update(data)
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
    """Objects made since the last :meth:`write_pack`, readable before they are written."""

    def __init__(self, read_stored: ObjectReader) -> None:
        self._read_stored = read_stored
        self._pending: dict[bytes, _Pending] = {}

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
        return oid

    def add_delta(self, kind: int, data: bytes, *, base: bytes, delta: bytes) -> bytes:
        """Store an object as ``delta`` (which turns ``base``, a pending object, into
        ``data``) and return its id."""
        oid = object_id(kind, data)
        if oid not in self._pending:
            self._pending[oid] = _Pending(kind, data, base, self._pending[base].depth + 1, delta)
        return oid

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

    def write_pack(self, pack_dir: Path) -> Path | None:
        """Write the pending objects as ``pack-<sha>.pack`` + ``.idx`` (both synced to disk,
        the index last, so that a reader never sees a pack without its objects)."""
        if not self._pending:
            return None
        body, index = _encode_pack(self._pending)
        pack_path = _install_pack(pack_dir, body, index)
        self._pending.clear()
        return pack_path


def _install_pack(pack_dir: Path, body: bytes, index: bytes) -> Path:
    """Put a pack and its index into ``pack_dir``, durably, the index last."""
    pack_dir.mkdir(parents=True, exist_ok=True)
    name = f"pack-{body[-20:].hex()}"
    pack_path = pack_dir / f"{name}.pack"
    _write_durably(pack_dir / f"tmp_{name}.pack", pack_path, body)
    _write_durably(pack_dir / f"tmp_{name}.idx", pack_dir / f"{name}.idx", index)
    sync_directory(pack_dir)
    return pack_path


def sync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_durably(temporary: Path, final: Path, data: bytes) -> None:
    temporary.unlink(missing_ok=True)  # read-only, left by a crash
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fdatasync(out.fileno())
    # Packs are immutable; git makes them read-only too.
    temporary.chmod(0o444)
    temporary.replace(final)


# -- merging packs ---------------------------------------------------------------------------


_OID = re.compile(rb".{20}", re.DOTALL)


def read_index(index: bytes) -> tuple[list[bytes], list[int], list[int]]:
    """The object ids of a version 2 pack index with their offsets in the pack and CRCs, in
    the index's (id) order."""
    if not index.startswith(b"\xfftOc\0\0\0\2"):
        raise ValueError("not a version 2 pack index")
    count = int.from_bytes(index[8 + 255 * 4 : 8 + 256 * 4], "big")
    ids_at = 8 + 256 * 4
    crcs_at = ids_at + 20 * count
    offsets_at = crcs_at + 4 * count
    large_at = offsets_at + 4 * count
    oids = _OID.findall(index, ids_at, crcs_at)
    crcs = list(struct.unpack_from(f">{count}I", index, crcs_at))
    offsets = list(struct.unpack_from(f">{count}I", index, offsets_at))
    if offsets and max(offsets) & 0x80000000:
        for i, offset in enumerate(offsets):
            if offset & 0x80000000:
                at = large_at + 8 * (offset & 0x7FFFFFFF)
                offsets[i] = int.from_bytes(index[at : at + 8], "big")
    return oids, offsets, crcs


def merge_packs(packs: list[Path], pack_dir: Path) -> Path:
    """Write one pack into ``pack_dir`` holding the objects of ``packs`` (paths of ``.pack``
    files with their ``.idx``), and return its path; the old packs are left alone.

    Entries are copied as they are stored: deltas stay deltas and nothing is decompressed,
    so the cost is one pass over the bytes, whatever the content. A pack sharing no object
    with those before it is copied whole (its internal offsets stay valid); otherwise its
    entries are copied one by one, repeated objects left out and offset deltas re-pointed.
    """
    if len(packs) == 1:  # nothing to merge: the same bytes under the same name
        body = packs[0].read_bytes()
        return _install_pack(pack_dir, body, packs[0].with_suffix(".idx").read_bytes())
    pack = bytearray(b"PACK\0\0\0\2\0\0\0\0")
    offsets: dict[bytes, int] = {}  # id -> offset in the new pack
    crcs: dict[bytes, int] = {}
    for path in packs:
        data = path.read_bytes()
        oids, old_offsets, old_crcs = read_index(path.with_suffix(".idx").read_bytes())
        if offsets.keys().isdisjoint(oids):
            shift = len(pack) - 12
            pack += memoryview(data)[12:-20]
            offsets.update(zip(oids, map(shift.__add__, old_offsets), strict=True))
            crcs.update(zip(oids, old_crcs, strict=True))
        else:
            entries = sorted(zip(old_offsets, oids, old_crcs, strict=True))
            _copy_entries(data, entries, pack, offsets, crcs)
    pack[8:12] = struct.pack(">I", len(offsets))
    checksum = hashlib.sha1(pack, usedforsecurity=False).digest()
    pack += checksum
    return _install_pack(pack_dir, bytes(pack), _encode_index(offsets, crcs, checksum))


def _copy_entries(
    data: bytes,
    entries: list[tuple[int, bytes, int]],
    pack: bytearray,
    offsets: dict[bytes, int],
    crcs: dict[bytes, int],
) -> None:
    """Append the entries (offset, id, crc; by offset) of one pack that are not in the new
    pack yet, with their offset deltas pointed at their base's place in the new pack."""
    ends = [offset for offset, _, _ in entries[1:]] + [len(data) - 20]
    at_offset = {offset: oid for offset, oid, _ in entries}
    for (start, oid, crc), end in zip(entries, ends, strict=True):
        if oid in offsets:
            continue
        at = start
        while data[at] & 0x80:  # type and size
            at += 1
        at += 1
        if (data[start] >> 4) & 7 == _OFS_DELTA:
            header = data[start:at]
            byte = data[at]
            distance = byte & 0x7F
            at += 1
            while byte & 0x80:
                byte = data[at]
                distance = ((distance + 1) << 7) | (byte & 0x7F)
                at += 1
            # The base, or the copy of it an earlier pack gave, is already in the new pack.
            base = offsets[at_offset[start - distance]]
            record = header + _offset_encoding(len(pack) - base) + data[at:end]
            crc = zlib.crc32(record)
        else:
            record = data[start:end]
        offsets[oid] = len(pack)
        crcs[oid] = crc
        pack += record


def _entry_header(kind: int, size: int) -> bytearray:
    byte = (kind << 4) | (size & 0x0F)
    size >>= 4
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
    whose comparisons run in C (a byte loop in Python would cost a hundred times more)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if a.startswith(b[low:middle], low):
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common suffix of ``a`` and ``b``, at most ``limit``."""
    low, high = 0, limit
    end_a, end_b = len(a), len(b)
    while low < high:
        middle = (low + high + 1) // 2
        if a.endswith(b[end_b - middle : end_b - low], 0, end_a - low):
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
    limit = min(len(base), len(target))
    prefix = _common_prefix(base, target, limit)
    suffix = _common_suffix(base, target, limit - prefix)
    out = _size_varint(len(base)) + _size_varint(len(target))
    _copy(out, 0, prefix)
    _insert(out, target[prefix : len(target) - suffix])
    _copy(out, len(base) - suffix, suffix)
    return bytes(out)


def _compress(data: bytes, level: int) -> bytes:
    """zlib with a window and hash table sized to the object.

    zlib's defaults allocate about 400 KiB per stream; for the few hundred bytes of a commit
    or a small tree, setting that up costs several times the compression itself.
    """
    bits = len(data).bit_length()
    window, memory = min(15, max(9, bits + 1)), min(8, max(1, bits - 4))
    stream = zlib.compressobj(level, zlib.DEFLATED, window, memory)
    return stream.compress(data) + stream.flush()


# Trees (and their deltas) are stored without compression: most of a tree is object ids,
# which do not compress, and these packs are merged, with compression, once they pile up.
_LEVELS = {COMMIT: 1, TREE: 0, BLOB: 1}


def _encode_pack(objects: dict[bytes, _Pending]) -> tuple[bytes, bytes]:
    pack = bytearray(b"PACK" + struct.pack(">II", 2, len(objects)))
    offsets: dict[bytes, int] = {}
    crcs: dict[bytes, int] = {}
    for oid, entry in objects.items():
        start = len(pack)
        if entry.base is not None:
            assert entry.delta is not None
            delta = entry.delta
            record = _entry_header(_OFS_DELTA, len(delta))
            record += _offset_encoding(start - offsets[entry.base])
            record += _compress(delta, _LEVELS[entry.kind])
        else:
            assert entry.data is not None  # only versions made into deltas drop theirs
            record = _entry_header(entry.kind, len(entry.data))
            record += _compress(entry.data, _LEVELS[entry.kind])
        offsets[oid] = start
        crcs[oid] = zlib.crc32(record)
        pack += record
    checksum = hashlib.sha1(pack, usedforsecurity=False).digest()
    pack += checksum
    return bytes(pack), _encode_index(offsets, crcs, checksum)


def _encode_index(offsets: dict[bytes, int], crcs: dict[bytes, int], checksum: bytes) -> bytes:
    """A version 2 pack index: fan-out table, sorted ids, CRCs, offsets, checksums."""
    oids = sorted(offsets)
    ids = b"".join(oids)
    first_bytes = ids[::20]
    fanout = [bisect_right(first_bytes, byte) for byte in range(256)]
    ordered = list(map(offsets.__getitem__, oids))
    large: list[int] = []
    if ordered and max(ordered) >= 0x80000000:
        for i, offset in enumerate(ordered):
            if offset >= 0x80000000:
                ordered[i] = 0x80000000 | len(large)
                large.append(offset)
    index = bytearray(b"\xfftOc" + struct.pack(">I", 2))
    index += struct.pack(">256I", *fanout)
    index += ids
    index += struct.pack(f">{len(oids)}I", *map(crcs.__getitem__, oids))
    index += struct.pack(f">{len(ordered)}I", *ordered)
    index += struct.pack(f">{len(large)}Q", *large)
    index += checksum
    index += hashlib.sha1(index, usedforsecurity=False).digest()
    return bytes(index)
