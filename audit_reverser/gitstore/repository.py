"""The pygit2 adapter: a bare local mirror of one remote branch that commits without a work tree.

All methods are blocking; the async writer calls them from a worker thread, one at a time.
Commits are built in memory (:mod:`.trees`, :mod:`.packing`) and reach the mirror as one
pack per batch when :meth:`Mirror.save` moves the branch; libgit2 reads, fetches and pushes.

When the remote branch moved since our last push (someone else pushed), our unpushed commits
are replayed on top of the new tip: each sets the files it changed to the content it gave
them, with its author, committer, dates and message unchanged. Files outside those paths
keep whatever the remote has; nothing is ever force-pushed.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pygit2
from pygit2.enums import DeltaStatus, SortMode

from audit_reverser.errors import MirrorWriteFailed, RemoteUnavailable, RepositoryError
from audit_reverser.gitstore.heap import release_free_memory
from audit_reverser.gitstore.localpush import (
    RemoteMoved,
    can_push_directly,
    clear_stale_lock,
    push_packs,
    write_ref,
)
from audit_reverser.gitstore.packing import BLOB, COMMIT, NewObjects, merge_packs, object_id
from audit_reverser.gitstore.packpush import PackPushUnsupported, push_pack
from audit_reverser.gitstore.transport import LocalTransport, NetworkTransport, Transport
from audit_reverser.gitstore.trees import WorkingTree
from audit_reverser.gitstore.types import FileChange, Identity, Signer, TreeChange

log = logging.getLogger(__name__)

REMOTE_NAME = "origin"
# Pushes that find the remote moved again, in a row, before we give up until the next try.
MAX_REPLAYS = 5
# Packs (one per batch) are kept in tiers of sizes within a factor of 4; after a push, once a
# tier holds 4 packs they are merged into one of the next tier (with any smaller ones). A
# mirror thus holds O(log n) packs, and each byte is copied once per tier: O(log n).
TIER_PACKS = 4

# libgit2's defaults suit a short command, not a long-running process in a pod with a
# memory limit: it caches parsed objects up to 256 MiB (a writer only ever needs the trees on
# the paths it changes), and maps packs in 1 GiB windows up to 8 GiB in all (mapped pages
# that were read count in the pod's memory until unmapped).
pygit2.settings.cache_max_size(32 * 1024 * 1024)
pygit2.settings.mwindow_size = 32 * 1024 * 1024
pygit2.settings.mwindow_mapped_limit = 64 * 1024 * 1024
# The pack builder of a push over SSH or HTTPS reads these from the mirror's configuration:
# by default it keeps up to 256 MiB of computed deltas and no bound on its delta window.
PACK_CONFIG = {"pack.deltaCacheSize": "16m", "pack.windowMemory": "64m"}


def _signature(identity: Identity, when: datetime) -> bytes:
    """``Name <email> seconds +hhmm``, as git writes an author or committer. The two parts
    that repeat from commit to commit are remembered: made afresh, they cost 6.6 µs of the
    Git thread per signature, two per commit."""
    return b"%s %d %s" % (_person(identity), int(when.timestamp()), _zone(when.utcoffset()))


@functools.lru_cache(maxsize=4096)
def _person(identity: Identity) -> bytes:
    # Names and emails come sanitized from the pipeline; a stray '<', '>' or newline would
    # still corrupt the header, so they never get through.
    name = " ".join(identity.name.translate(_HEADER_UNSAFE).split())
    email = identity.email.translate(_HEADER_UNSAFE).strip()
    return f"{name} <{email}>".encode()


@functools.lru_cache(maxsize=256)
def _zone(offset: timedelta | None) -> bytes:
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{minutes:02d}".encode()


# The trailer by which a commit message names the API request it records.
_REQUEST = "Audit-ID: "
_HEADER_UNSAFE = str.maketrans({"<": None, ">": None, "\n": " ", "\0": None})


def _oid(raw: bytes) -> pygit2.Oid:
    return pygit2.Oid(raw=raw)


class Mirror:
    """A bare repository under the state directory that mirrors one branch of one remote."""

    def __init__(
        self,
        path: Path,
        transport: Transport,
        branch: str,
        committer: Identity,
        *,
        create_local_remote: bool = False,
        signer: Signer | None = None,
    ) -> None:
        self.path = path
        self.transport = transport
        self.branch = branch
        self.committer = committer
        self.signer = signer  # when set, every commit we make or replay is signed
        self._create_local_remote = create_local_remote
        self._local_ref = f"refs/heads/{branch}"
        self._tracking_ref = f"refs/remotes/{REMOTE_NAME}/{branch}"
        self._repo: pygit2.Repository | None = None
        self.unpushed = 0
        self.replays = 0  # times our commits were replayed onto a moved remote branch
        self._objects = NewObjects(self._read_stored)
        # The branch tip lives here between saves: a batch of commits moves the branch
        # reference once (save()), not once per commit.
        self._head: bytes | None = None
        self._saved: bytes | None = None
        self._unsaved = 0
        self._tree = WorkingTree(self._objects, None)
        # path -> (fingerprint, blob id) of files committed with a FileChange.fingerprint
        self._fingerprints: dict[str, tuple[str, bytes]] = {}
        self._fingerprints_changed = False
        # Files set and removed by the last TreeChange committed (a resync reports them).
        self.tree_counts = (0, 0)
        # The packs written since the remote last had all our commits: what a push hands over
        # (to a local, SSH or HTTPS remote). None when unknown (commits of an earlier run):
        # libgit2 pushes.
        self._outgoing: list[Path] | None = None
        self._builds_on: bytes | None = None
        self._pack_push_unsupported = False  # the remote or key needs libgit2's push
        # HA: raises unless we may still push (asked before every push attempt, replays
        # included, from the Git thread: so it must not block).
        self.fence: Callable[[], None] | None = None

    @property
    def repo(self) -> pygit2.Repository:
        if self._repo is None:
            raise RepositoryError(f"mirror {self.path} is not open")
        return self._repo

    def _read_stored(self, oid: bytes) -> tuple[int, bytes]:
        kind, data = self.repo.odb.read(_oid(oid))
        return int(kind), data

    # -- start-up ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the mirror and build on its branch as last saved.

        Nothing here needs the network: :meth:`sync` brings the remote's news.
        """
        if isinstance(self.transport, LocalTransport) and not self.transport.path.exists():
            if not self._create_local_remote:
                raise RepositoryError(f"remote repository {self.transport.display} does not exist")
            pygit2.init_repository(str(self.transport.path), bare=True, initial_head=self.branch)
            log.info("created local remote repository %s", self.transport.display)
        try:
            if (self.path / "HEAD").exists():
                self._repo = pygit2.Repository(str(self.path))
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._repo = pygit2.init_repository(
                    str(self.path), bare=True, initial_head=self.branch
                )
        except pygit2.GitError as exc:
            raise RepositoryError(f"cannot open mirror {self.path}: {exc}") from exc
        # A pack whose writing a crash interrupted; its commits were never on the branch.
        for leftover in (self.path / "objects" / "pack").glob("tmp_pack-*"):
            leftover.unlink(missing_ok=True)
        # A branch update a crash interrupted: nobody else writes the mirror (the state
        # directory is locked), and libgit2 as well as our own update would fail on it.
        for ref in (self._local_ref, self._tracking_ref):
            (self.path / (ref + ".lock")).unlink(missing_ok=True)
        self._fingerprints = _load_fingerprints(self._fingerprint_file)
        config = self.repo.config
        for name, value in PACK_CONFIG.items():
            config[name] = value
        remotes = self.repo.remotes
        if REMOTE_NAME in remotes.names():
            remotes.set_url(REMOTE_NAME, self.transport.url)
        else:
            remotes.create(REMOTE_NAME, self.transport.url)
        self._choose_base()

    def sync(self) -> None:
        """Fetch the remote branch and build on it (our unpushed commits replayed on top)."""
        self._fetch()
        self._choose_base()

    @property
    def is_open(self) -> bool:
        return self._repo is not None

    def reset_to_remote(self, *, fetch: bool = True) -> None:
        """Fetch, and build on the remote's tip, dropping our unpushed commits. For a writer
        taking over in HA mode: their events wait in the shared journal, and the replica that
        wrote in the meantime may have pushed them already.

        ``fetch=False`` (the remote does not answer): build on the tip fetched last. What is
        committed then reaches the remote by a replay onto whatever it holds by then, which
        leaves out the changes it holds already."""
        remote = self._fetch() if fetch else self._target(self._tracking_ref)
        if remote is not None:
            self.repo.references.create(self._local_ref, _oid(remote), force=True)
        elif self.repo.references.get(self._local_ref) is not None:
            self.repo.references.delete(self._local_ref)
        self._choose_base()

    def _fetch(self) -> bytes | None:
        """Fetch the remote branch into the tracking reference; its tip, None when empty."""
        remote = self.repo.remotes[REMOTE_NAME]
        refspec = f"+refs/heads/{self.branch}:{self._tracking_ref}"
        callbacks = self.transport.callbacks()
        try:
            remote.fetch([refspec], callbacks=callbacks)
        except pygit2.GitError as exc:
            raise RemoteUnavailable(
                f"fetch from {self.transport.display} failed: {callbacks.explain(exc)}"
            ) from exc
        return self._target(self._tracking_ref)

    def _target(self, ref: str) -> bytes | None:
        reference = self.repo.references.get(ref)
        if reference is None:
            return None
        target = reference.target
        return target.raw if isinstance(target, pygit2.Oid) else None

    def _choose_base(self) -> None:
        local, remote = self._target(self._local_ref), self._target(self._tracking_ref)
        if remote is None:
            # Empty remote branch: everything local (if anything) is still to be pushed.
            self.unpushed = sum(1 for _ in self.repo.walk(_oid(local))) if local else 0
            self._outgoing = None if local else []
        elif local is None or local == remote:
            self.repo.references.create(self._local_ref, _oid(remote), force=True)
            self.unpushed = 0
            self._outgoing = []
        else:
            self._outgoing = None
            ahead, behind = self.repo.ahead_behind(_oid(local), _oid(remote))
            if behind and ahead:
                self._moved_to(local)
                self._replay_onto(remote)
                ahead = self.unpushed
            elif behind:
                self.repo.references.create(self._local_ref, _oid(remote), force=True)
            self.unpushed = ahead
        self._moved_to(self._target(self._local_ref))

    def _moved_to(self, head: bytes | None) -> None:
        """Start building on ``head`` (the saved branch tip), forgetting anything unsaved."""
        self._objects.discard()
        self._head = self._saved = head
        # Every commit made from here on has it as an ancestor: a push from a remote tip
        # equal to it needs no walk of the history to know it is a fast-forward.
        self._builds_on = head
        self._unsaved = 0
        self._tree = WorkingTree(self._objects, self._tree_of(head) if head else None)

    def _tree_of(self, commit: bytes) -> bytes:
        kind, data = self._objects.read(commit)
        if kind != COMMIT or not data.startswith(b"tree "):
            raise RepositoryError(f"{self.path}: object {commit.hex()} is not a commit")
        return bytes.fromhex(data[5:45].decode())

    # -- commits ----------------------------------------------------------------------------

    @property
    def tip(self) -> str | None:
        return self._head.hex() if self._head is not None else None

    def read(self, path: str) -> bytes | None:
        """The content of ``path`` at the branch tip, or None."""
        blob = self._tree.get(path)
        if blob is None:
            return None
        kind, data = self._objects.read(blob)
        return data if kind == BLOB else None

    def changes_since(self, since: str | None) -> list[tuple[str, str, list[str]]]:
        """``(commit id, message, changed paths)`` of the commits after ``since``, oldest first.

        Walks the whole history when ``since`` is None or not in it (a mirror made anew).
        """
        self.save()
        if self._head is None:
            return []
        walker = self.repo.walk(_oid(self._head), SortMode.TOPOLOGICAL | SortMode.REVERSE)
        if since is not None:
            try:
                walker.hide(pygit2.Oid(hex=since))
            except (ValueError, KeyError, pygit2.GitError):
                log.warning("%s: commit %s is gone; scanning the whole history", self.path, since)
        return [
            (str(commit.id), commit.message, [path for path, _ in _changes(commit)])
            for commit in walker
        ]

    def latest_changes(self, limit: int) -> list[tuple[str, str, list[str]]]:
        """:meth:`changes_since` for the newest ``limit`` commits only (oldest first): a
        walk that reads only as far back as it must, whatever the history's length."""
        self.save()
        if self._head is None:
            return []
        walker = self.repo.walk(_oid(self._head), SortMode.TOPOLOGICAL)
        newest = [commit for _, commit in zip(range(limit), walker, strict=False)]
        return [
            (str(commit.id), commit.message, [path for path, _ in _changes(commit)])
            for commit in reversed(newest)
        ]

    def last_message(self, path: str) -> str | None:
        """The message of the newest saved commit that changed ``path``; None when no commit
        did. Walks back from the tip until it finds one: for files not written recently."""
        if self._saved is None:
            return None
        for commit in self.repo.walk(_oid(self._saved), SortMode.TOPOLOGICAL):
            parent = commit.parents[0].tree if commit.parents else None
            if _entry_id(commit.tree, path) != _entry_id(parent, path):
                return commit.message
        return None

    def commit(self, change: FileChange | TreeChange) -> str | None:
        """Commit one change on the branch tip; None when it would change nothing."""
        try:
            if isinstance(change, TreeChange):
                return self._commit_tree(change)
            if not self._stage(change):
                return None
            return self._make_commit(change.message, change.author, change.time)
        except (pygit2.GitError, OSError, ValueError) as exc:
            what = change.path if isinstance(change, FileChange) else "a snapshot"
            raise MirrorWriteFailed(f"cannot commit {what} in {self.path}: {exc}") from exc

    def _commit_tree(self, change: TreeChange) -> str | None:
        written = sum(self._stage(entry) for entry in change.files)
        removed = 0
        folders = [*change.prune]
        for pattern in change.prune_matching:
            folders += self._tree.folders_matching(pattern)
        for folder in folders:
            for path in self._tree.files_under(folder):
                if path not in change.keep:
                    self._tree.set(path, None)
                    if self._fingerprints.pop(path, None) is not None:
                        self._fingerprints_changed = True
                    removed += 1
        self.tree_counts = (written, removed)
        if not written and not removed:
            return None
        return self._make_commit(change.message, change.author, change.time)

    def _stage(self, change: FileChange) -> bool:
        """Put ``change`` into the working tree; False when it changes nothing."""
        current = self._tree.get(change.path)
        if change.content is None:
            if current is None:
                return False
            blob = None
        else:
            blob = object_id(BLOB, change.content)
            if blob == current:
                return False
            known = self._fingerprints.get(change.path)
            if change.fingerprint is not None and known == (change.fingerprint, current):
                return False  # the same meaning, already in the file
            self._objects.add(BLOB, change.content)
        self._tree.set(change.path, blob)
        for path, content in change.also:
            extra = object_id(BLOB, content)
            if self._tree.get(path) != extra:
                self._objects.add(BLOB, content)
                self._tree.set(path, extra)
        if change.fingerprint is not None and blob is not None:
            self._fingerprints[change.path] = (change.fingerprint, blob)
            self._fingerprints_changed = True
        elif change.path in self._fingerprints:
            del self._fingerprints[change.path]
            self._fingerprints_changed = True
        return True

    def _make_commit(self, message: str, author: Identity, time: datetime) -> str:
        tree = self._tree.write()
        headers = [b"tree " + tree.hex().encode()]
        if self._head is not None:
            headers.append(b"parent " + self._head.hex().encode())
        headers.append(b"author " + _signature(author, time))
        headers.append(b"committer " + _signature(self.committer, time))
        data = b"\n".join(headers) + b"\n\n" + message.encode()
        self._head = self._objects.add(COMMIT, _signed(data, self.signer))
        self._unsaved += 1
        self.unpushed += 1
        return self._head.hex()

    @property
    def unsaved(self) -> int:
        """Commits made since the last :meth:`save`."""
        return self._unsaved

    def save(self) -> None:
        """Write the commits made since the last save (one pack) and move the branch to them.
        On failure they are dropped (their events stay in the journal) and the error raised."""
        if self._head == self._saved:
            return
        assert self._head is not None
        try:
            pack = self._objects.write_pack(self.path / "objects" / "pack")
            self._write_branch(self._head)
            if pack is not None and self._outgoing is not None:
                self._outgoing.append(pack)
            if self._fingerprints_changed:
                _save_fingerprints(self._fingerprint_file, self._fingerprints)
                self._fingerprints_changed = False
        except (pygit2.GitError, OSError) as exc:
            self.unpushed -= self._unsaved
            self._moved_to(self._saved)
            raise MirrorWriteFailed(
                f"cannot update branch {self.branch} in {self.path}: {exc}"
            ) from exc
        self._saved = self._head
        self._unsaved = 0

    @property
    def _fingerprint_file(self) -> Path:
        return self.path / "audit-reverser" / "fingerprints.json"

    def _write_branch(self, head: bytes) -> None:
        """Move the branch to ``head``, on disk before its events count as committed: the
        journal forgets them once we return, and a power cut must not take the branch back.
        Written here, not by libgit2, which first looks the commit up in every pack (its
        strict object creation): 1.6 ms with the GIL held once a few hundred batch packs
        wait for a push, as under a steady trickle of writes."""
        write_ref(self.path, self._local_ref, head)

    # -- push -------------------------------------------------------------------------------

    def push(self) -> int:
        """Push the branch (never forced); returns how many of our commits the remote now
        holds (those a replay left out included).

        When the remote branch moved, our commits are replayed onto its new tip and pushed
        again; a transport failure is raised as :class:`RemoteUnavailable`.
        """
        self.save()
        there = 0  # commits left out of a replay: the remote holds them already
        for _ in range(MAX_REPLAYS):
            if self._head is None or not self.unpushed:
                return there
            if self.fence is not None:
                self.fence()
            try:
                self._push_once()
            except RemoteUnavailable as exc:
                remote = self._fetch()
                if remote is None or self._contains(self._head, remote):
                    if isinstance(exc, RemoteMoved):
                        # It moved back, or was deleted: libgit2 works out what it lacks.
                        self._outgoing = None
                        continue
                    raise  # the remote did not move: a transport or permission problem
                there += self._replay_onto(remote)
                continue
            pushed = self.unpushed
            self._pushed(self._head, pushed, None)
            return pushed + there
        raise RemoteUnavailable(
            f"branch {self.branch} of {self.transport.display} moved {MAX_REPLAYS} times while "
            "we pushed; trying again later"
        )

    def _pushed(self, head: bytes, commits: int, packs: list[Path] | None) -> None:
        """The remote now holds ``head``: the ``commits`` before it and the ``packs`` that
        carried them (None: all there were) are no longer waiting, and the packs are merged
        as tiers fill."""
        self.unpushed -= commits
        if packs is None or self._outgoing is None:
            self._outgoing = []
        else:
            self._outgoing = [pack for pack in self._outgoing if pack not in packs]
        self._builds_on = head
        try:
            self._consolidate()
        except (OSError, pygit2.GitError, ValueError) as exc:
            # Merging only saves reads; the packs as they are hold everything.
            log.warning("%s: could not merge packs: %s", self.path, exc)
        self._release_caches()

    # -- a push while commits go on (BranchWriter) ------------------------------------------
    #
    # begin_push and end_push run on the Git thread, send on a thread of its own: it reads
    # only the plan's pack files (never changed or removed until end_push) and the remote, so
    # commits can be made and saved meanwhile. A remote that moved, or a push our packs cannot
    # carry, is left to push() after end_push, as the rare case it is.

    def begin_push(self) -> PushPlan | None:
        """Save, and say what :meth:`send` is to push: the branch tip as it is now and the one
        pack of the commits up to it. None when :meth:`push` must push (nothing to push, the
        commits of an earlier run, a remote our packs cannot be handed to)."""
        self.save()
        if self._head is None or not self.unpushed or not self._outgoing:
            return None
        if isinstance(self.transport, LocalTransport):
            if not can_push_directly(self.transport.path, self._local_ref):
                return None
            # Here, not in send(): whether a lock names our commit asks libgit2, which the
            # Git thread uses meanwhile (a repository must not be used by two at once).
            clear_stale_lock(self.transport.path, self._local_ref, self._made_here)
        elif not isinstance(self.transport, NetworkTransport) or self._pack_push_unsupported:
            return None
        if self.fence is not None:
            self.fence()
        self._merge_outgoing()
        try:
            old = self._last_seen_remote_tip()
        except RemoteMoved:
            return None
        return PushPlan(
            head=self._head, old=old, packs=tuple(self._outgoing), commits=self.unpushed
        )

    def send(self, plan: PushPlan) -> None:
        """Hand ``plan``'s packs to the remote and move its branch from ``plan.old`` to
        ``plan.head``; raises as the transport fails. Safe beside commits and saves."""
        if self.fence is not None:
            self.fence()
        packs = list(plan.packs)
        if isinstance(self.transport, LocalTransport):
            push_packs(self.transport.path, self._local_ref, plan.old, plan.head, packs)
        else:
            assert isinstance(self.transport, NetworkTransport)
            scratch = self.path / "audit-reverser" / "outgoing"
            push_pack(self.transport, self._local_ref, plan.old, plan.head, packs, scratch)

    def end_push(self, plan: PushPlan, error: BaseException | None) -> bool:
        """After :meth:`send`: True when it pushed ``plan``; False when :meth:`push` is to
        push now (the remote moved: it replays; our packs cannot go there: libgit2); any
        other failure raised as :class:`RemoteUnavailable`."""
        if error is None:
            self.repo.references.create(self._tracking_ref, _oid(plan.head), force=True)
            self._pushed(plan.head, plan.commits, list(plan.packs))
            return True
        if isinstance(error, PackPushUnsupported):
            self._pack_push_unsupported = True
            log.info("%s: pushing with libgit2: %s", self.transport.display, error)
            return False
        if isinstance(error, RemoteMoved):
            return False
        if isinstance(error, OSError):  # reading or merging our own packs
            raise RemoteUnavailable(f"push to {self.transport.display} failed: {error}") from error
        raise error

    def _release_caches(self) -> None:
        """Drop libgit2's caches and return the freed memory, once a push is done.

        A push over SSH or HTTPS reads the trees of every commit it carries through libgit2:
        each open pack keeps up to 16 MiB of delta bases (nothing bounds their sum) and the
        object cache keeps parsed trees. They fill again as needed.
        """
        self.repo.free()
        release_free_memory()

    def _made_here(self, oid: bytes) -> bool:
        """Whether the commit ``oid`` was made in this mirror and not yet seen in the remote:
        in the mirror, and not the remote branch's tip as last fetched or pushed, nor one of
        its ancestors (someone resetting the branch to an older commit of its history holds
        a lock naming a commit we have too, and that lock is not ours to break). On the Git
        thread only."""
        commit = _oid(oid)
        if commit not in self.repo:
            return False
        seen = self._target(self._tracking_ref)
        return seen is None or (seen != oid and not self.repo.descendant_of(_oid(seen), commit))

    def _push_once(self) -> None:
        assert self._head is not None
        self._merge_outgoing()
        if (
            isinstance(self.transport, LocalTransport)
            and self._outgoing is not None
            and can_push_directly(self.transport.path, self._local_ref)
        ):
            old = self._last_seen_remote_tip()
            push_packs(
                self.transport.path,
                self._local_ref,
                old,
                self._head,
                self._outgoing,
                self._made_here,
            )
        elif isinstance(self.transport, LocalTransport):
            clear_stale_lock(self.transport.path, self._local_ref, self._made_here)
            self._push_with_libgit2()
        elif not self._sent_our_packs():
            self._push_with_libgit2()
        self.repo.references.create(self._tracking_ref, _oid(self._head), force=True)

    def _last_seen_remote_tip(self) -> bytes | None:
        """The remote tip as last fetched, which our packs build on; RemoteMoved when our
        branch does not contain it (never forced: the remote's tip must be in what we push,
        as git checks)."""
        assert self._head is not None
        old = self._target(self._tracking_ref)
        if old is not None and old != self._builds_on and not self._contains(self._head, old):
            raise RemoteMoved(f"{self.branch} of {self.transport.display} moved")
        return old

    def _sent_our_packs(self) -> bool:
        """Send an SSH or HTTPS remote our packs through receive-pack (:mod:`.packpush`);
        False when libgit2 must push instead (the reason logged once)."""
        if (
            not isinstance(self.transport, NetworkTransport)
            or not self._outgoing
            or self._pack_push_unsupported
        ):
            return False
        assert self._head is not None
        old = self._last_seen_remote_tip()
        scratch = self.path / "audit-reverser" / "outgoing"
        try:
            push_pack(self.transport, self._local_ref, old, self._head, self._outgoing, scratch)
        except PackPushUnsupported as exc:
            self._pack_push_unsupported = True
            log.info("%s: pushing with libgit2: %s", self.transport.display, exc)
            return False
        except OSError as exc:  # reading or merging our own packs
            raise RemoteUnavailable(f"push to {self.transport.display} failed: {exc}") from exc
        return True

    def _push_with_libgit2(self) -> None:
        callbacks = self.transport.callbacks()
        refspec = f"{self._local_ref}:{self._local_ref}"
        try:
            self.repo.remotes[REMOTE_NAME].push([refspec], callbacks=callbacks)
        except pygit2.GitError as exc:
            raise RemoteUnavailable(
                f"push to {self.transport.display} failed: {callbacks.explain(exc)}"
            ) from exc
        if callbacks.rejected:
            reason = "; ".join(f"{ref}: {msg}" for ref, msg in callbacks.rejected.items())
            raise RemoteUnavailable(f"push to {self.transport.display} was rejected: {reason}")

    def _contains(self, commit: bytes, ancestor: bytes) -> bool:
        return commit == ancestor or self.repo.descendant_of(_oid(commit), _oid(ancestor))

    def _replay_onto(self, remote: bytes) -> int:
        """Rewrite our commits that the remote lacks on top of ``remote`` and save them;
        returns how many were left out as already there.

        A commit of ours is left out when the remote's new commits record each request it
        records (its Audit-IDs) for each file it changed: in HA, a writer that lost its
        lease while pushing may have pushed the same events that its successor committed
        again. Commits that name no request (snapshots, resyncs) are always replayed.
        If saving fails (a full disk), the branch stays on our original commits."""
        assert self._head is not None
        original, unpushed = self._head, self.unpushed
        walker = self.repo.walk(_oid(self._head), SortMode.TOPOLOGICAL | SortMode.REVERSE)
        walker.hide(_oid(remote))
        ours = [(commit, _changes(commit)) for commit in walker]
        there = self._recorded_since(remote, original, ours)
        self._moved_to(remote)
        self._saved = original  # as on disk: saved below, even when every commit is left out
        self.unpushed = 0
        left_out = 0
        try:
            for commit, changes in ours:
                if _recorded(commit.message, changes, there):
                    left_out += 1
                    continue
                for path, blob in changes:
                    self._tree.set(path, blob)
                tree = self._tree.write()
                kind, data = self.repo.odb.read(commit.id)
                rebased = _rebased(data, tree, self._head)
                self._head = self._objects.add(COMMIT, _signed(rebased, self.signer))
                self._unsaved += 1
                self.unpushed += 1
            self.save()
        except (pygit2.GitError, OSError, MirrorWriteFailed):
            self._moved_to(original)
            self.unpushed = unpushed
            raise
        self.replays += 1
        log.warning(
            "%s: branch %s of %s moved; replayed our %d unpushed commits on top of %s%s",
            self.path,
            self.branch,
            self.transport.display,
            len(ours) - left_out,
            remote.hex()[:12],
            f" ({left_out} left out: the remote holds their changes already)" if left_out else "",
        )
        return left_out

    def _recorded_since(
        self,
        remote: bytes,
        base: bytes,
        ours: list[tuple[pygit2.Commit, list[tuple[str, bytes | None]]]],
    ) -> set[tuple[str, str]]:
        """The (request, file) pairs that the commits on ``remote`` and not on ``base``
        record, among the requests ``ours`` name: only those commits are diffed."""
        asked = {request for commit, _ in ours for request in _requests(commit.message)}
        if not asked:
            return set()
        walker = self.repo.walk(_oid(remote), SortMode.TOPOLOGICAL)
        walker.hide(_oid(base))
        pairs: set[tuple[str, str]] = set()
        for commit in walker:
            requests = _requests(commit.message) & asked
            if requests:
                pairs.update((r, path) for r in requests for path, _ in _changes(commit))
        return pairs

    def _merge_outgoing(self) -> None:
        """Replace the packs written since the last push with one pack of them all.

        Every push sends one pack (hard-linked into a local remote, streamed to an SSH or
        HTTPS one), so several batch packs were merged for it anyway, and then merged again
        in the mirror with the rest of their tier. Merged here once, in the mirror, the push
        takes that pack as it is and the tiers start one level up: each object is copied
        one time less (a drain of 30,000 spread commits: 4-6 % less CPU per commit)."""
        if self._outgoing is None or len(self._outgoing) < 2:
            return
        try:
            merged = merge_packs(self._outgoing, self.path / "objects" / "pack")
        except (OSError, ValueError) as exc:  # the push merges them in its own way then
            log.warning("%s: could not merge the packs to push: %s", self.path, exc)
            return
        self._drop_packs(self._outgoing)
        self._outgoing = [merged]

    def _consolidate(self) -> None:
        """Merge the packs of the smallest full tier (and any smaller ones) into one, and
        again while that fills the next tier."""
        pack_dir = self.path / "objects" / "pack"
        while True:
            waiting = set(self._outgoing or ())  # a push to come carries them as they are
            packs = [
                (p.stat().st_size, p)
                for p in pack_dir.glob("pack-*.pack")
                if _mergeable(p) and p not in waiting
            ]
            merged = _full_tier(packs)
            if len(merged) < 2:
                return
            merge_packs(merged, pack_dir)
            self._drop_packs(merged)

    def _drop_packs(self, packs: list[Path]) -> None:
        """Remove ``packs``, whose objects a pack merged from them now holds."""
        for pack in packs:
            for suffix in (".idx", ".rev", ".bitmap", ".pack"):
                pack.with_suffix(suffix).unlink(missing_ok=True)
        # git's multi-pack index (if someone made one here) would name the removed packs.
        (self.path / "objects" / "pack" / "multi-pack-index").unlink(missing_ok=True)
        # libgit2 keeps the removed packs open (their index files mapped whole: 13 MiB of
        # RSS after 40,000 commits) until the repository is opened again, and frees the old
        # handle only when Python's cycle collector gets to it (pygit2's Repository and its
        # collections refer to each other): let go of the packs now.
        if self._repo is not None:
            self._repo.free()
        self._repo = pygit2.Repository(str(self.path))
        log.debug("%s: merged %d packs into one", self.path, len(packs))


@dataclass(frozen=True, kw_only=True, slots=True)
class PushPlan:
    """A push :meth:`Mirror.send` makes: move the remote branch from ``old`` to ``head``
    with ``packs``, which hold the ``commits`` made since the last push."""

    head: bytes
    old: bytes | None
    packs: tuple[Path, ...]
    commits: int


def _entry_id(tree: pygit2.Tree | None, path: str) -> pygit2.Oid | None:
    if tree is None:
        return None
    try:
        return tree[path].id
    except KeyError:
        return None


def _changes(commit: pygit2.Commit) -> list[tuple[str, bytes | None]]:
    """The files ``commit`` changed against its first parent: ``(path, blob id or None)``."""
    if commit.parents:
        diff = commit.tree.diff_to_tree(commit.parents[0].tree, swap=True)
    else:
        diff = commit.tree.diff_to_tree(swap=True)
    changes: list[tuple[str, bytes | None]] = []
    for delta in diff.deltas:
        if delta.status == DeltaStatus.DELETED:
            changes.append((delta.old_file.path, None))
        else:
            changes.append((delta.new_file.path, delta.new_file.id.raw))
    return changes


def _requests(message: str) -> set[str]:
    """The requests a commit records: its ``Audit-ID`` trailers (the commit contract of
    :mod:`audit_reverser.pipeline.commits`; an Audit-ID names one API request)."""
    return {line[len(_REQUEST) :] for line in message.splitlines() if line.startswith(_REQUEST)}


def _recorded(
    message: str, changes: list[tuple[str, bytes | None]], there: set[tuple[str, str]]
) -> bool:
    """Whether ``there`` holds each (request, file) pair of a commit: its change was made."""
    requests = _requests(message)
    return bool(requests and changes) and all(
        (request, path) in there for request in requests for path, _ in changes
    )


def _rebased(data: bytes, tree: bytes, parent: bytes | None) -> bytes:
    """A raw commit with its tree and parent replaced and its signature (which no longer
    matches) removed; every other byte stays the same."""
    header, separator, message = data.partition(b"\n\n")
    lines = [b"tree " + tree.hex().encode()]
    if parent is not None:
        lines.append(b"parent " + parent.hex().encode())
    dropped = False
    for line in header.split(b"\n"):
        # A header's continuation lines start with a space and go with the header.
        if not line.startswith(b" "):
            dropped = line.startswith((b"tree ", b"parent ", b"gpgsig ", b"gpgsig-sha256 "))
        if not dropped:
            lines.append(line)
    return b"\n".join(lines) + separator + message


def _signed(data: bytes, signer: Signer | None) -> bytes:
    """``data`` (a raw commit) with a ``gpgsig`` header of its signature after the other
    headers, as ``git commit -S`` writes it: the signature covers the commit without it."""
    if signer is None:
        return data
    header, separator, message = data.partition(b"\n\n")
    signature = signer(data).rstrip(b"\n").replace(b"\n", b"\n ")
    return header + b"\ngpgsig " + signature + separator + message


def _mergeable(pack: Path) -> bool:
    """A pack with its index, which nobody asked to keep as it is."""
    return pack.with_suffix(".idx").is_file() and not (
        pack.with_suffix(".keep").exists() or pack.with_suffix(".promisor").exists()
    )


def _tier(size: int) -> int:
    return (size.bit_length() - 1) // (TIER_PACKS.bit_length() - 1)


def _full_tier(packs: list[tuple[int, Path]]) -> list[Path]:
    """The packs of the smallest tier that holds :data:`TIER_PACKS` packs, with the packs
    of every smaller tier; none when no tier is full."""
    count: dict[int, int] = {}
    for size, _ in packs:
        count[_tier(size)] = count.get(_tier(size), 0) + 1
    full = [tier for tier, n in count.items() if n >= TIER_PACKS]
    if not full:
        return []
    return [path for size, path in packs if _tier(size) <= min(full)]


def _load_fingerprints(path: Path) -> dict[str, tuple[str, bytes]]:
    """Fingerprints saved by an earlier run; a lost or damaged file only costs a commit of
    each such file the next time it changes."""
    try:
        saved = json.loads(path.read_text())
        return {p: (f, bytes.fromhex(b)) for p, (f, b) in saved.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, AttributeError):
        log.warning("%s is damaged; Secrets are encrypted again on their next change", path)
        return {}


def _save_fingerprints(path: Path, fingerprints: dict[str, tuple[str, bytes]]) -> None:
    path.parent.mkdir(exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({p: [f, b.hex()] for p, (f, b) in fingerprints.items()}))
    temporary.replace(path)
