"""Pushing to a repository on this machine by handing it the packs we already wrote.

libgit2's push builds a new pack for every push: it walks the new commits, reads every
object back and searches deltas for each (it cannot reuse the deltas stored in our packs),
which cost more than making the commits. For a local bare repository the same result is
cheaper to get directly: the packs written since the last push hold exactly the objects the
remote lacks, already compressed and delta-encoded, so they are merged (copied as stored)
into one pack in the remote's object directory (one pack is hard-linked there where the
file system allows), and then the branch moves, but only if it
still points where we last saw it. That is how ``git receive-pack`` and libgit2's local
transport update a branch: the reference is locked with a ``.lock`` file created exclusively,
compared, written, synced and renamed into place. Someone else's push in between makes ours
fail as a rejected (non-fast-forward) push would, and the caller replays as it does then.

A lock left behind by a push that never finished (its process killed between taking and
releasing it: git's own commands then fail on that branch until someone removes the file by
hand) is removed once it is older than any ref update takes, :data:`STALE_LOCK_S`, so that a
``kill -9`` of a writer does not stop every later push.

Nothing is ever forced, and a remote this code does not understand (not bare, references in
a reftable, the branch a symbolic reference) is left to libgit2's push.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from audit_reverser.errors import RemoteUnavailable
from audit_reverser.files import sync_directory
from audit_reverser.gitstore.packing import merge_packs

log = logging.getLogger(__name__)

# A ref update holds its lock for milliseconds (compare, write, rename); one this old was
# left by a process that died holding it. Only one writer per branch runs (one process, or
# the lease holder in HA), so breaking it cannot take a lock from a live writer of ours.
STALE_LOCK_S = 10.0


class RemoteMoved(RemoteUnavailable):
    """The remote branch is not where we last saw it: someone else pushed."""


def can_push_directly(remote: Path, ref: str) -> bool:
    """Whether ``remote`` is a bare repository whose ``ref`` we know how to update."""
    if not (remote / "HEAD").is_file() or not (remote / "objects" / "pack").is_dir():
        return False  # a work tree's .git folder, or not a repository at all
    try:
        config = (remote / "config").read_text(errors="replace").lower()
    except OSError:
        return False
    if "refstorage" in config or "bare = false" in config.replace("\t", " "):
        return False
    loose = remote / ref
    return not (loose.is_file() and loose.read_bytes().startswith(b"ref:"))


def push_packs(
    remote: Path,
    ref: str,
    old: bytes | None,
    new: bytes,
    packs: list[Path],
    ours: Callable[[bytes], bool] | None = None,
) -> None:
    """Put the objects of ``packs`` into ``remote`` and move ``ref`` from ``old`` (None: it
    must not exist yet) to ``new``; :class:`RemoteMoved` when it is somewhere else. ``ours``:
    see :func:`clear_stale_lock`."""
    try:
        if len(packs) == 1:
            _link_pack(packs[0], remote / "objects" / "pack")
        elif packs:
            merge_packs(packs, remote / "objects" / "pack")
        _update_ref(remote, ref, old, new, ours)
    except OSError as exc:
        raise RemoteUnavailable(f"cannot write to {remote}: {exc}") from exc


def _link_pack(pack: Path, pack_dir: Path) -> None:
    """Give ``pack_dir`` the same pack file (packs never change): a hard link where the two
    share a file system, so nothing is copied or synced again; else a durable copy."""
    try:
        for suffix in (".pack", ".idx"):  # the index last: it makes the pack visible
            target = pack_dir / pack.with_suffix(suffix).name
            if not target.exists():
                os.link(pack.with_suffix(suffix), target)
    except OSError:  # another file system, or links not allowed
        merge_packs([pack], pack_dir)
        return
    sync_directory(pack_dir)


def _update_ref(
    remote: Path, ref: str, old: bytes | None, new: bytes, ours: Callable[[bytes], bool] | None
) -> None:
    def unmoved(current: bytes | None) -> None:
        if current != old:
            seen = current.hex()[:12] if current else "nothing"
            raise RemoteMoved(f"{ref} in {remote} moved (it is at {seen})")

    clear_stale_lock(remote, ref, ours)
    try:
        write_ref(remote, ref, new, check=unmoved)
    except FileExistsError:
        raise RemoteMoved(f"{ref} in {remote} is being updated by someone else") from None


def write_ref(
    repo: Path, ref: str, new: bytes, *, check: Callable[[bytes | None], None] | None = None
) -> None:
    """Point ``ref`` of ``repo`` at ``new`` as git does: under ``<ref>.lock``, created
    exclusively (FileExistsError while someone holds it), written and synced, then renamed
    into place and its directory synced. ``check`` is shown where ``ref`` points first (None:
    nowhere) and raises to leave it as it is."""
    path = repo / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            if check is not None:
                check(_read_ref(repo, ref))
            os.write(fd, new.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        lock.replace(path)
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def clear_stale_lock(remote: Path, ref: str, ours: Callable[[bytes], bool] | None = None) -> None:
    """Remove ``ref``'s lock in ``remote`` when an update that never finished left it: also
    before libgit2's push, which would otherwise fail on it at every try. A lock that names a
    commit ``ours`` says is one of the caller's own (made in its mirror, which one process
    at a time uses) was left by an earlier run killed while pushing it, and goes at once: a
    restart need not wait for it to age."""
    lock = remote / (ref + ".lock")
    try:
        age = time.time() - lock.stat().st_mtime
        named = lock.read_bytes().strip()
    except OSError:
        return  # none (the usual case), or not ours to look at
    if age < STALE_LOCK_S and not (ours is not None and _names(named, ours)):
        return
    log.warning(
        "%s: removed %s, left %.0fs ago by an update that never finished (a process killed "
        "while holding it)",
        remote,
        lock.relative_to(remote),
        age,
    )
    lock.unlink(missing_ok=True)


def _names(content: bytes, ours: Callable[[bytes], bool]) -> bool:
    """Whether a lock's ``content`` (what its update was writing) is a commit of ``ours``."""
    try:
        oid = bytes.fromhex(content.decode("ascii"))
    except ValueError:  # empty (killed before it wrote), or not an object id
        return False
    return len(oid) == 20 and ours(oid)


def _read_ref(remote: Path, ref: str) -> bytes | None:
    """The id ``ref`` points at: its loose file, else its line in packed-refs, else None."""
    try:
        loose = (remote / ref).read_bytes().strip()
    except FileNotFoundError:
        pass
    else:
        return bytes.fromhex(loose.decode()) if loose else None
    try:
        packed = (remote / "packed-refs").read_bytes()
    except FileNotFoundError:
        return None
    suffix = b" " + ref.encode()
    for line in packed.splitlines():
        if line.endswith(suffix) and not line.startswith((b"#", b"^")):
            return bytes.fromhex(line[: -len(suffix)].decode())
    return None
