"""The tree of a branch tip, loaded lazily along the paths that change.

A commit that changes one file rewrites only the trees on that file's path: each directory
level keeps its entries already encoded, in Git's order, so writing it again is one join
and one hash, however many files live elsewhere in the repository.
"""

from __future__ import annotations

import fnmatch
import re
from bisect import bisect_left

from audit_reverser.gitstore.packing import TREE, NewObjects

TREE_MODE = b"40000"
FILE_MODE = b"100644"
EMPTY_TREE = bytes.fromhex("4b825dc642cb6eb9a060e54bf8d69288fbee4904")

# Mode, name, NUL and a 20-byte id; names hold no NUL and ids any byte.
_ENTRY = re.compile(rb"(([0-7]+) ([^\0]+)\0.{20})", re.DOTALL)

# Loaded directories are forgotten past this many entries in all; they load again on use.
MAX_CACHED_ENTRIES = 500_000


def _sort_key(name: bytes, mode: bytes) -> bytes:
    # Git orders a subtree as if its name ended in '/'.
    return name + b"/" if mode == TREE_MODE else name


class Directory:
    """One tree: its entries encoded as Git stores them, kept in Git's order."""

    __slots__ = ("keys", "modes", "oid", "records", "written")

    def __init__(self, data: bytes = b"", oid: bytes | None = None) -> None:
        self.modes: dict[bytes, bytes] = {}
        self.keys: list[bytes] = []  # sort keys, in Git's order
        self.records: list[bytes] = []  # b"<mode> <name>\0<20-byte id>", in the same order
        self.oid = oid  # None while changed and not yet written
        self.written = oid  # the last id written or loaded: the base for a delta
        if data:
            found = _ENTRY.findall(data)
            self.records = [record for record, _, _ in found]
            self.modes = {name: mode for _, mode, name in found}
            self.keys = [name + b"/" if mode == TREE_MODE else name for _, mode, name in found]
            if sum(map(len, self.records)) != len(data):
                raise ValueError(f"tree {oid.hex() if oid else ''} is malformed")

    def __len__(self) -> int:
        return len(self.modes)

    def _position(self, name: bytes, mode: bytes) -> int:
        return bisect_left(self.keys, _sort_key(name, mode))

    def entry(self, name: bytes) -> tuple[bytes, bytes] | None:
        """``(mode, id)`` of ``name``, or None."""
        mode = self.modes.get(name)
        if mode is None:
            return None
        return mode, self.records[self._position(name, mode)][-20:]

    def set(self, name: bytes, mode: bytes, oid: bytes) -> None:
        record = b"%s %s\0%s" % (mode, name, oid)
        old_mode = self.modes.get(name)
        if old_mode == mode:
            self.records[self._position(name, mode)] = record
        else:
            if old_mode is not None:
                self.remove(name)
            position = self._position(name, mode)
            self.keys.insert(position, _sort_key(name, mode))
            self.records.insert(position, record)
            self.modes[name] = mode
        self.oid = None

    def remove(self, name: bytes) -> None:
        position = self._position(name, self.modes.pop(name))
        del self.keys[position]
        del self.records[position]
        self.oid = None

    def encode(self) -> bytes:
        return b"".join(self.records)


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
                directory.oid = self._objects.add(
                    TREE, directory.encode(), delta_of=directory.written
                )
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
