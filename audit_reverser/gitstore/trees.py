"""The tree of a branch tip, loaded lazily along the paths that change.

A commit that changes one file rewrites only the trees on that file's path: each directory
level keeps its entries already encoded, in Git's order, so writing it again is one join
and one hash, however many files live elsewhere in the repository.
"""

from __future__ import annotations

import fnmatch
import re
from array import array
from bisect import bisect_left, bisect_right
from itertools import accumulate, chain

from audit_reverser.gitstore.packing import (
    MAX_DELTA_DEPTH,
    TREE,
    NewObjects,
    chunked_delta,
    compose_delta,
)

TREE_MODE = b"40000"
FILE_MODE = b"100644"
EMPTY_TREE = bytes.fromhex("4b825dc642cb6eb9a060e54bf8d69288fbee4904")

# Mode, name, NUL and a 20-byte id; names hold no NUL and ids any byte.
_ENTRY = re.compile(rb"(([0-7]+) ([^\0]+)\0.{20})", re.DOTALL)

# Loaded directories are forgotten past this many entries in all; they load again on use.
MAX_CACHED_ENTRIES = 500_000
# A tree at least this big (about 1,500 entries) that is written whole keeps a copy of its
# entries' order, so that its versions further down the batch can be deltas against it.
BASE_MIN_SIZE = 64 * 1024


def _sort_key(name: bytes, mode: bytes) -> bytes:
    # Git orders a subtree as if its name ended in '/'.
    return name + b"/" if mode == TREE_MODE else name


# Entries are kept in runs of about this many, each with its encoding cached: writing a tree
# again after one change joins the runs and re-encodes one, not every entry of a big folder.
RUN = 256


class _Base:
    """A version of a big tree written whole in this batch, and the entries changed since."""

    __slots__ = ("changed", "keys", "offsets", "oid")

    def __init__(self, oid: bytes, directory: Directory) -> None:
        self.oid = oid
        self.keys = list(chain.from_iterable(directory.run_keys))
        records = chain.from_iterable(directory.runs)
        # Of each entry in the tree: 8 bytes each in an array, not a Python int each (this
        # is made once per batch for a folder of maybe 80,000 files).
        self.offsets = array("Q", (0,))
        self.offsets.extend(accumulate(map(len, records)))
        self.changed: set[bytes] = set()  # sort keys

    def delta_to(self, directory: Directory, size: int) -> bytes:
        """The delta from this version to ``directory`` (encoded in ``size`` bytes): copies
        of the runs of entries in between the changed ones, the changed entries inserted.
        Its cost grows with the changes, not with the folder."""
        ops: list[tuple[int, int] | bytes] = []
        at = 0  # the next entry of the base still to copy
        for key in sorted(self.changed):
            position = bisect_left(self.keys, key)
            ops.append((self.offsets[at], self.offsets[position] - self.offsets[at]))
            in_base = position < len(self.keys) and self.keys[position] == key
            at = position + 1 if in_base else position
            record = directory.record(key)
            if record is not None:
                ops.append(record)
        ops.append((self.offsets[at], self.offsets[-1] - self.offsets[at]))
        return compose_delta(self.offsets[-1], size, ops)


class Directory:
    """One tree: its entries encoded as Git stores them, kept in Git's order, in runs."""

    __slots__ = (
        "base",
        "encoded",
        "firsts",
        "modes",
        "oid",
        "run_keys",
        "runs",
        "written",
        "written_runs",
    )

    def __init__(self, data: bytes = b"", oid: bytes | None = None) -> None:
        self.modes: dict[bytes, bytes] = {}
        # Runs of entries: sort keys and records (b"<mode> <name>\0<20-byte id>"), in Git's
        # order; firsts[i] is the first key of run i (b"" for the first run).
        self.run_keys: list[list[bytes]] = [[]]
        self.runs: list[list[bytes]] = [[]]
        self.firsts: list[bytes] = [b""]
        self.encoded: list[bytes | None] = [None]  # each run's records joined, when known
        self.oid = oid  # None while changed and not yet written
        self.written = oid  # the last id written or loaded: the base for a delta
        self.base: _Base | None = None
        # The encoded runs of ``written``, when this tree wrote it: the next version of a big
        # tree is a delta made from them, and never joined whole.
        self.written_runs: list[bytes] | None = None
        if data:
            found = _ENTRY.findall(data)
            records = [record for record, _, _ in found]
            self.modes = {name: mode for _, mode, name in found}
            keys = [name + b"/" if mode == TREE_MODE else name for _, mode, name in found]
            if sum(map(len, records)) != len(data):
                raise ValueError(f"tree {oid.hex() if oid else ''} is malformed")
            self.run_keys = [keys[i : i + RUN] for i in range(0, len(keys), RUN)]
            self.runs = [records[i : i + RUN] for i in range(0, len(records), RUN)]
            self.firsts = [b"", *(run[0] for run in self.run_keys[1:])]
            self.encoded = [None] * len(self.runs)

    def __len__(self) -> int:
        return len(self.modes)

    def _locate(self, key: bytes) -> tuple[int, int]:
        """(run, index in it) where ``key`` is or would go."""
        run = bisect_right(self.firsts, key) - 1
        return run, bisect_left(self.run_keys[run], key)

    def record(self, key: bytes) -> bytes | None:
        """The record of the entry with sort key ``key``, or None."""
        run, index = self._locate(key)
        keys = self.run_keys[run]
        return self.runs[run][index] if index < len(keys) and keys[index] == key else None

    def entry(self, name: bytes) -> tuple[bytes, bytes] | None:
        """``(mode, id)`` of ``name``, or None."""
        mode = self.modes.get(name)
        if mode is None:
            return None
        run, index = self._locate(_sort_key(name, mode))
        return mode, self.runs[run][index][-20:]

    def set(self, name: bytes, mode: bytes, oid: bytes) -> None:
        record = b"%s %s\0%s" % (mode, name, oid)
        key = _sort_key(name, mode)
        old_mode = self.modes.get(name)
        if old_mode == mode:
            run, index = self._locate(key)
            self.runs[run][index] = record
        else:
            if old_mode is not None:
                self.remove(name)
            run, index = self._locate(key)
            self.run_keys[run].insert(index, key)
            self.runs[run].insert(index, record)
            self.modes[name] = mode
            if len(self.runs[run]) > 2 * RUN:
                self._split(run)
        self.encoded[run] = None
        if self.base is not None:
            self.base.changed.add(key)
        self.oid = None

    def _split(self, run: int) -> None:
        keys, records = self.run_keys[run], self.runs[run]
        self.run_keys[run : run + 1] = [keys[:RUN], keys[RUN:]]
        self.runs[run : run + 1] = [records[:RUN], records[RUN:]]
        self.firsts.insert(run + 1, keys[RUN])
        self.encoded[run : run + 1] = [None, None]

    def remove(self, name: bytes) -> None:
        key = _sort_key(name, self.modes.pop(name))
        run, index = self._locate(key)
        del self.run_keys[run][index]
        del self.runs[run][index]
        self.encoded[run] = None
        if not self.runs[run] and len(self.runs) > 1:
            del self.run_keys[run], self.runs[run], self.firsts[run], self.encoded[run]
            self.firsts[0] = b""
        elif index == 0 and run > 0:
            self.firsts[run] = self.run_keys[run][0]
        if self.base is not None:
            self.base.changed.add(key)
        self.oid = None

    def store(self, objects: NewObjects) -> bytes:
        """Add this version to ``objects``: as a delta of the previous one while that chain
        is short, else of the batch's whole version, else whole; returns its id. A big
        tree's deltas are made from its runs, without joining it (see ``written_runs``)."""
        runs = self._encoded_runs()
        size = sum(map(len, runs))
        previous = objects.depth(self.written) if self.written is not None else None
        last, self.written_runs = self.written_runs, runs
        chained = previous is not None and previous < MAX_DELTA_DEPTH
        if size < BASE_MIN_SIZE:
            data = b"".join(runs)
            return objects.add(TREE, data, delta_of=self.written if chained else None)
        if chained and last is not None:
            assert self.written is not None
            delta = chunked_delta(last, runs, size)
            return objects.add_chunks(TREE, runs, size, base=self.written, delta=delta)
        if self.base is not None and objects.depth(self.base.oid) == 0:
            delta = self.base.delta_to(self, size)
            return objects.add_chunks(TREE, runs, size, base=self.base.oid, delta=delta)
        oid = objects.add(TREE, b"".join(runs), delta_of=self.written if chained else None)
        self.base = _Base(oid, self) if objects.depth(oid) == 0 else None
        return oid

    def _encoded_runs(self) -> list[bytes]:
        encoded = self.encoded
        for run, joined in enumerate(encoded):
            if joined is None:
                encoded[run] = b"".join(self.runs[run])
        return list(encoded)  # type: ignore[arg-type]  # none is None any more


class WorkingTree:
    """The root tree of a commit being built, with the directories on changed paths."""

    def __init__(self, objects: NewObjects, root: bytes | None) -> None:
        self._objects = objects
        self._dirs: dict[str, Directory] = {}
        self._changed: set[str] = set()
        self._root_id = root
        self._entries = 0

    def _load(self, oid: bytes) -> Directory:
        kind, data = self._objects.read(oid)
        if kind != TREE:
            raise ValueError(f"object {oid.hex()} is not a tree")
        directory = Directory(data, oid)
        self._entries += len(directory)
        return directory

    def _directory(self, path: str, *, create: bool) -> Directory | None:
        found = self._dirs.get(path)
        if found is not None:
            return found
        if path == "":
            directory = self._load(self._root_id) if self._root_id else Directory()
        else:
            parent_path, _, name = path.rpartition("/")
            parent = self._directory(parent_path, create=create)
            if parent is None:
                return None
            entry = parent.entry(name.encode())
            if entry is not None and entry[0] == TREE_MODE:
                directory = self._load(entry[1])
            elif create:
                directory = Directory()
            else:
                return None
        self._dirs[path] = directory
        return directory

    def get(self, path: str) -> bytes | None:
        """The blob id at ``path``, or None."""
        parent_path, _, name = path.rpartition("/")
        directory = self._directory(parent_path, create=False)
        if directory is None:
            return None
        entry = directory.entry(name.encode())
        return entry[1] if entry is not None and entry[0] != TREE_MODE else None

    def set(self, path: str, blob: bytes | None) -> None:
        """Put ``blob`` at ``path`` (remove the file when None)."""
        parent_path, _, name = path.rpartition("/")
        directory = self._directory(parent_path, create=blob is not None)
        if directory is None:
            return
        if blob is None:
            if directory.entry(name.encode()) is None:
                return
            directory.remove(name.encode())
        else:
            directory.set(name.encode(), FILE_MODE, blob)
        while True:
            self._changed.add(parent_path)
            if not parent_path:
                break
            parent_path = parent_path.rpartition("/")[0]

    def files_under(self, folder: str) -> list[str]:
        """Every file below ``folder`` (a path without trailing slash)."""
        directory = self._directory(folder, create=False)
        if directory is None:
            return []
        found = []
        for name, mode in directory.modes.items():
            path = f"{folder}/{name.decode()}"
            if mode == TREE_MODE:
                found += self.files_under(path)
            else:
                found.append(path)
        return found

    def folders_matching(self, pattern: str) -> list[str]:
        """The folders whose path matches ``pattern`` segment by segment (fnmatch)."""
        found = [""]
        for segment in pattern.split("/"):
            deeper = []
            for parent in found:
                directory = self._directory(parent, create=False)
                if directory is None:
                    continue
                for name, mode in directory.modes.items():
                    if mode == TREE_MODE and fnmatch.fnmatchcase(name.decode(), segment):
                        deeper.append(f"{parent}/{name.decode()}" if parent else name.decode())
            found = deeper
        return sorted(found)

    def write(self) -> bytes:
        """Write the changed trees, deepest first, and return the root tree's id."""
        for path in sorted(self._changed, key=lambda p: p.count("/") + (p != ""), reverse=True):
            directory = self._dirs[path]
            if path:
                parent_path, _, name = path.rpartition("/")
                parent = self._dirs[parent_path]
                if not directory:
                    if parent.entry(name.encode()) is not None:
                        parent.remove(name.encode())
                    continue
            if directory.oid is None:
                directory.oid = directory.store(self._objects)
                directory.written = directory.oid
            if path:
                parent.set(name.encode(), TREE_MODE, directory.oid)
        self._changed.clear()
        root = self._dirs.get("")
        if root is not None:
            self._root_id = root.oid
        if self._entries > MAX_CACHED_ENTRIES:
            self._dirs.clear()
            self._entries = 0
        return self._root_id if self._root_id is not None else self._objects.add(TREE, b"")
