"""The pygit2 adapter: a bare local mirror of one remote branch that commits without a work tree.

All methods are blocking; the async writer calls them from a worker thread, one at a time.
Each commit rewrites only the trees on the path of the changed file, so its cost does not
grow with the number of files elsewhere in the repository.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pygit2
from pygit2.enums import FileMode, SortMode

from audit_reverser.errors import MirrorWriteFailed, RemoteUnavailable, RepositoryError
from audit_reverser.gitstore.transport import LocalTransport, Transport
from audit_reverser.gitstore.types import FileChange, Identity

log = logging.getLogger(__name__)

REMOTE_NAME = "origin"

# libgit2 caches parsed objects up to 256 MiB by default; a long-running writer only ever
# needs the trees on the paths it changes.
pygit2.settings.cache_max_size(32 * 1024 * 1024)


def _signature(identity: Identity, change: FileChange) -> pygit2.Signature:
    offset = change.time.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    return pygit2.Signature(identity.name, identity.email, int(change.time.timestamp()), minutes)


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
    ) -> None:
        self.path = path
        self.transport = transport
        self.branch = branch
        self.committer = committer
        self._create_local_remote = create_local_remote
        self._local_ref = f"refs/heads/{branch}"
        self._tracking_ref = f"refs/remotes/{REMOTE_NAME}/{branch}"
        self._repo: pygit2.Repository | None = None
        self.unpushed = 0
        # The branch tip lives here between saves: a batch of commits moves the branch
        # reference once (save()), not once per commit, which would cost a file write each.
        self._head: pygit2.Oid | None = None
        self._saved: pygit2.Oid | None = None
        self._unsaved = 0

    @property
    def repo(self) -> pygit2.Repository:
        if self._repo is None:
            raise RepositoryError(f"mirror {self.path} is not open")
        return self._repo

    # -- start-up ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the mirror, fetch the remote branch and pick the base to commit on."""
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
                self._repo = pygit2.init_repository(str(self.path), bare=True)
        except pygit2.GitError as exc:
            raise RepositoryError(f"cannot open mirror {self.path}: {exc}") from exc
        remotes = self.repo.remotes
        if REMOTE_NAME in remotes.names():
            remotes.set_url(REMOTE_NAME, self.transport.url)
        else:
            remotes.create(REMOTE_NAME, self.transport.url)
        self.fetch()

    def fetch(self) -> None:
        remote = self.repo.remotes[REMOTE_NAME]
        refspec = f"+refs/heads/{self.branch}:{self._tracking_ref}"
        try:
            remote.fetch([refspec], callbacks=self.transport.callbacks())
        except pygit2.GitError as exc:
            raise RemoteUnavailable(f"fetch from {self.transport.display} failed: {exc}") from exc
        self._choose_base()

    def _target(self, ref: str) -> pygit2.Oid | None:
        reference = self.repo.references.get(ref)
        if reference is None:
            return None
        target = reference.target
        return target if isinstance(target, pygit2.Oid) else None

    def _choose_base(self) -> None:
        local, remote = self._target(self._local_ref), self._target(self._tracking_ref)
        if remote is None:
            # Empty remote branch: everything local (if anything) is still to be pushed.
            self.unpushed = sum(1 for _ in self.repo.walk(local)) if local is not None else 0
        elif local is None or local == remote:
            self.repo.references.create(self._local_ref, remote, force=True)
            self.unpushed = 0
        else:
            ahead, behind = self.repo.ahead_behind(local, remote)
            if behind and ahead:
                raise RemoteUnavailable(
                    f"branch {self.branch} of {self.transport.display} has commits that the "
                    f"mirror {self.path} does not ({ahead} of ours are not pushed); refusing to "
                    "overwrite them"
                )
            if behind:
                self.repo.references.create(self._local_ref, remote, force=True)
            self.unpushed = ahead
        self._head = self._saved = self._target(self._local_ref)
        self._unsaved = 0

    # -- commits ----------------------------------------------------------------------------

    @property
    def tip(self) -> str | None:
        return str(self._head) if self._head is not None else None

    def read(self, path: str) -> bytes | None:
        """The content of ``path`` at the branch tip, or None."""
        tip = self._head
        if tip is None:
            return None
        tree = self.repo[tip].peel(pygit2.Tree)
        try:
            entry = tree[path]
        except KeyError:
            return None
        blob = self.repo[entry.id]
        return blob.data if isinstance(blob, pygit2.Blob) else None

    def changes_since(self, since: str | None) -> list[tuple[str, str, list[str]]]:
        """``(commit id, message, changed paths)`` of the commits after ``since``, oldest first.

        Walks the whole history when ``since`` is None or not in it (a mirror made anew).
        """
        tip = self._head
        if tip is None:
            return []
        walker = self.repo.walk(tip, SortMode.TOPOLOGICAL | SortMode.REVERSE)
        if since is not None:
            try:
                walker.hide(pygit2.Oid(hex=since))
            except (ValueError, KeyError, pygit2.GitError):
                log.warning("%s: commit %s is gone; scanning the whole history", self.path, since)
        found = []
        for commit in walker:
            if commit.parents:
                diff = commit.tree.diff_to_tree(commit.parents[0].tree, swap=True)
            else:
                diff = commit.tree.diff_to_tree(swap=True)
            paths = [delta.new_file.path for delta in diff.deltas]
            found.append((str(commit.id), commit.message, paths))
        return found

    def commit(self, change: FileChange) -> str | None:
        """Commit one change on the branch tip; None when it would change nothing."""
        try:
            return self._commit(change)
        except (pygit2.GitError, OSError) as exc:
            raise MirrorWriteFailed(f"cannot commit {change.path} in {self.path}: {exc}") from exc

    def _commit(self, change: FileChange) -> str | None:
        repo = self.repo
        tip = self._head
        root = repo[tip].peel(pygit2.Tree) if tip is not None else None
        try:
            current = root[change.path].id if root is not None else None
        except KeyError:
            current = None
        if change.content is None:
            if current is None:
                return None
            blob = None
        else:
            blob = pygit2.hash(change.content)
            if blob == current:
                return None
            repo.create_blob(change.content)
        tree = _write_tree(repo, root, change.path.split("/"), blob) or _empty_tree(repo)
        if root is not None and tree == root.id:
            return None
        commit = repo.create_commit(
            None,
            _signature(change.author, change),
            _signature(self.committer, change),
            change.message,
            tree,
            [tip] if tip is not None else [],
        )
        self._head = commit
        self._unsaved += 1
        self.unpushed += 1
        return str(commit)

    def save(self) -> None:
        """Move the branch to the commits made since the last save. On failure they are
        dropped from the branch (their events stay in the journal) and the error raised."""
        if self._head == self._saved:
            return
        assert self._head is not None
        try:
            self.repo.references.create(self._local_ref, self._head, force=True)
        except (pygit2.GitError, OSError) as exc:
            self._head = self._saved
            self.unpushed -= self._unsaved
            self._unsaved = 0
            raise MirrorWriteFailed(
                f"cannot update branch {self.branch} in {self.path}: {exc}"
            ) from exc
        self._saved = self._head
        self._unsaved = 0

    # -- push -------------------------------------------------------------------------------

    def push(self) -> int:
        """Push the branch (never forced); returns how many commits it carried."""
        self.save()
        tip = self._head
        if tip is None or not self.unpushed:
            return 0
        callbacks = self.transport.callbacks()
        refspec = f"{self._local_ref}:{self._local_ref}"
        try:
            self.repo.remotes[REMOTE_NAME].push([refspec], callbacks=callbacks)
        except pygit2.GitError as exc:
            raise RemoteUnavailable(f"push to {self.transport.display} failed: {exc}") from exc
        rejected: dict[str, str] = getattr(callbacks, "rejected", {})
        if rejected:
            reason = "; ".join(f"{ref}: {msg}" for ref, msg in rejected.items())
            raise RemoteUnavailable(f"push to {self.transport.display} was rejected: {reason}")
        self.repo.references.create(self._tracking_ref, tip, force=True)
        pushed, self.unpushed = self.unpushed, 0
        return pushed


def _empty_tree(repo: pygit2.Repository) -> pygit2.Oid:
    return repo.TreeBuilder().write()


def _write_tree(
    repo: pygit2.Repository, tree: pygit2.Tree | None, parts: Sequence[str], blob: pygit2.Oid | None
) -> pygit2.Oid | None:
    """The id of ``tree`` with ``parts`` set to ``blob`` (removed when None); None if empty."""
    builder = repo.TreeBuilder(tree) if tree is not None else repo.TreeBuilder()
    head, rest = parts[0], parts[1:]
    existing = builder.get(head)
    if rest:
        subtree = None
        if existing is not None and existing.filemode == FileMode.TREE:
            subtree = repo[existing.id].peel(pygit2.Tree)
        child = _write_tree(repo, subtree, rest, blob)
    else:
        child = blob
    if child is None:
        if existing is not None:
            builder.remove(head)
    else:
        builder.insert(head, child, FileMode.TREE if rest else FileMode.BLOB)
    if len(builder) == 0:
        return None
    return builder.write()
