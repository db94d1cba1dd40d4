"""One ordered writer per (remote, branch): commits in a worker thread, pushes in batches.

Changes for a repository branch are committed strictly in the order they were submitted,
whichever GitTargets or GitProviders they came from. A push happens when ``max_commits``
are waiting or ``interval`` has passed since the first unpushed commit; a failed push is
retried with capped exponential back-off while commits keep accumulating locally.

After a crash, :meth:`BranchWriter.recover` reads the commits made since the journal's last
checkpoint; a change processed again whose commit is among them (same message, so same
auditID, and same path) is answered with that commit instead of being committed twice.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from audit_reverser.errors import (
    AuditReverserError,
    MirrorWriteFailed,
    RemoteUnavailable,
    TemporaryError,
)
from audit_reverser.gitstore.repository import Mirror
from audit_reverser.gitstore.types import CommitOutcome, FileChange, TreeChange

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_LIMIT = 256
# A save (a pack and the branch, each synced to disk) waits this long after the first
# commit made since the last one, or for BATCH_LIMIT commits or SAVE_BYTES of content: under
# a trickle of writes (a few per audit batch) a save per batch cost more than its commits,
# and the hundreds of small packs it left were merged again at every push. Only the local
# commit waits: the apiserver's acknowledgement needs the journal alone.
SAVE_DELAY_S = 0.1
SAVE_BYTES = 1024 * 1024
# While more changes wait in the queue (a backlog drains), a push waits for this many
# commits (or push.interval): each push has a cost of its own (a connection, a pack, a
# reference update), and these commits reach the remote sooner in a few large pushes.
BACKLOG_PUSH_COMMITS = 1024
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
# A stop's push, when the remote is away or its branch locked for a moment, is tried again
# sooner than a running writer's: the stop's deadline is seconds away, not minutes.
FINAL_RETRY_MIN_S = 0.25
FINAL_RETRY_MAX_S = 2.0


# Upper bounds (seconds) of the push duration histogram: a push to a nearby server takes
# tenths of a second, a backlog after an outage or a slow remote tens of seconds.
PUSH_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(kw_only=True, slots=True)
class WriterStats:
    commits: int = 0
    unchanged: int = 0
    failed: int = 0
    recovered: int = 0
    pushes: int = 0
    pushed_commits: int = 0
    push_failures: int = 0
    last_push_at: datetime | None = None
    push_seconds: float = 0.0  # time spent in pushes, failed ones included
    # Pushes (failed ones included) per PUSH_SECONDS_BUCKETS bound, the last for longer ones.
    push_histogram: list[int] = field(default_factory=lambda: [0] * (len(PUSH_SECONDS_BUCKETS) + 1))

    def pushed_in(self, seconds: float) -> None:
        self.push_seconds += seconds
        self.push_histogram[bisect.bisect_left(PUSH_SECONDS_BUCKETS, seconds)] += 1


@dataclass(frozen=True, kw_only=True, slots=True)
class _Recovered(CommitOutcome):
    """A change whose commit an earlier run made before it could record so."""


class Touched:
    """The files (and pruned folders) of the changes submitted to a writer while it is
    watched (:meth:`BranchWriter.watching`): what a reader of the cluster must leave alone,
    because a change it did not see may already be queued for them."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.folders: set[str] = set()

    def add(self, change: FileChange | TreeChange) -> None:
        if isinstance(change, FileChange):
            self.files.add(change.path)
        else:
            self.files.update(entry.path for entry in change.files)
            self.folders.update(change.prune)

    def covers(self, path: str) -> bool:
        """A change touched ``path`` itself, or may have removed it with its folder."""
        return path in self.files or any(path.startswith(f"{f}/") for f in self.folders)

    def overlaps(self, folder: str) -> bool:
        """A folder pruned here and a folder a change pruned contain one another."""
        return any(
            f == folder or f.startswith(f"{folder}/") or folder.startswith(f"{f}/")
            for f in self.folders
        )


@dataclass(frozen=True, slots=True)
class _Flush:
    done: asyncio.Future[int]


@dataclass(frozen=True, slots=True)
class _Wake:
    """Queued when a push made alongside the commits ends: the writer looks at its push
    deadline again even if no change comes."""


_WAKE = _Wake()


@dataclass(frozen=True, slots=True)
class _Change:
    change: FileChange | TreeChange
    done: asyncio.Future[CommitOutcome]


def _content_size(change: FileChange | TreeChange) -> int:
    if isinstance(change, TreeChange):
        return sum(len(file.content or b"") for file in change.files)
    return len(change.content or b"")


class GitThread(concurrent.futures.Executor):
    """The one thread that touches a writer's mirror: calls run there in submission order.

    It is a daemon thread: a push stuck on a silent server (libgit2 gives up only after its
    own timeout) must not keep the process alive past the shut-down time. Stopping it there
    is safe: the mirror's writes are a pack file and an atomic reference update, and a
    half-written pack is removed on the next start.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def submit(  # type: ignore[override]
        self, fn: Callable[[], T], /
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((future, fn))
        if not self._thread.is_alive():
            self._thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            if wait:
                self._thread.join()

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting task, as executors do
                future.set_exception(exc)


class BranchWriter:
    def __init__(
        self,
        mirror: Mirror,
        *,
        push_interval_s: float,
        push_max_commits: int,
        queue_size: int = 10_000,
    ) -> None:
        self.mirror = mirror
        self.name = f"{mirror.transport.display}#{mirror.branch}"
        # Stable across runs and unique per repository branch: the journal's name for us.
        self.key = mirror.path.name
        self.push_interval_s = push_interval_s
        self.push_max_commits = push_max_commits
        self.stats = WriterStats()
        self.last_push_error: str | None = None
        self._queue: asyncio.Queue[_Change | _Flush | _Wake | None] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self._push_deadline: float | None = None
        # Changes committed since the last save, with their outcomes, answered once saved
        # (see SAVE_DELAY_S). A queue under 1,024 (the intake's window, which may be no
        # bigger) is saved once a quarter of it waits, so that a full window never waits.
        self._unsaved: list[tuple[_Change, CommitOutcome | BaseException]] = []
        self._unsaved_bytes = 0
        self._save_deadline: float | None = None
        self._save_commits = min(BATCH_LIMIT, max(1, queue_size // 4))
        self._retry_s = RETRY_MIN_S
        self._final_push_until: float | None = None  # see close()
        self._recovered: dict[tuple[str, str], str] = {}
        self._thread = GitThread(f"git {mirror.path.name}")
        # A push made while commits go on (see _push_soon), and the thread it sends from.
        self._pushing: asyncio.Task[None] | None = None
        self._sender: GitThread | None = None
        self._watchers: list[Touched] = []
        # HA: raises unless this replica may still write the branch; awaited before every
        # commit batch and every push (see :meth:`take_over`).
        self.fence: Callable[[], Awaitable[None]] | None = None

    async def _blocking(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def open(self) -> None:
        """Open the mirror as last saved; no network. :meth:`recover` may follow."""
        await self._blocking(self.mirror.open)

    def start(self) -> None:
        """Start the writer task, whose first step is to fetch: a remote slow to answer must
        not keep the receiver from starting, and the mirror has one user at a time."""
        self._task = asyncio.create_task(self._run(), name=f"git-writer {self.name}")
        self._task.add_done_callback(self._crashed)

    async def _sync(self) -> None:
        try:
            await self._blocking(self.mirror.sync)
        except TemporaryError as exc:
            # Events are still taken and committed locally; the first push that gets
            # through replays them onto whatever the remote holds by then.
            self.last_push_error = str(exc)
            log.error("%s: %s; committing locally until it answers", self.name, exc)
            self._push_deadline = asyncio.get_running_loop().time() + self._next_delay()
        if self.mirror.unpushed:
            log.info(
                "%s: %d commits from an earlier run wait to be pushed",
                self.name,
                self.mirror.unpushed,
            )
            if self._push_deadline is None:
                self._push_deadline = asyncio.get_running_loop().time()

    async def recover(self, since: str | None) -> list[tuple[str, str]]:
        """Remember the commits made after ``since``; returns their ``(path, message)``s.
        Between :meth:`open` and :meth:`start`."""
        changes = await self._blocking(lambda: self.mirror.changes_since(since))
        found = self._remember(changes)
        if changes:
            log.info(
                "%s: %d commits made after the last journal checkpoint", self.name, len(changes)
            )
        return found

    async def take_over(self, history: int) -> list[tuple[str, str]]:
        """HA: become the branch's writer after another replica. Drops the commits our
        mirror did not push (their events wait in the shared journal, and the other replica
        may have pushed them), builds on the remote's tip and remembers the newest
        ``history`` commits, so that an event found there is answered with its commit
        instead of being committed twice. Returns their ``(path, message)``s. Before
        :meth:`start`.

        A remote that does not answer does not hold the takeover up (nor the other branches'
        writers): this writer builds on the tip fetched last and commits locally until the
        remote answers, as any writer does."""
        try:
            await self.warm()
        except RemoteUnavailable as exc:
            log.error(
                "%s: %s; taking over on the remote's tip fetched last, committing locally "
                "until it answers",
                self.name,
                exc,
            )
            await self._blocking(lambda: self.mirror.reset_to_remote(fetch=False))
        changes = await self._blocking(lambda: self.mirror.latest_changes(history))
        found = self._remember(changes)
        log.info("%s: read the newest %d commits of the remote's history", self.name, len(changes))
        return found

    def _remember(self, changes: list[tuple[str, str, list[str]]]) -> list[tuple[str, str]]:
        """Answer a change processed again with the commit already made for it (same message
        and path); returns those ``(path, message)``s."""
        found = []
        for commit_id, message, paths in changes:
            for path in paths:
                self._recovered[(message, path)] = commit_id
                found.append((path, message))
        return found

    async def warm(self) -> None:
        """HA, on a standby: bring the mirror to the remote's tip (nothing committed, nothing
        pushed), so that a takeover fetches only what is new since."""
        await self._blocking(self.mirror.reset_to_remote)

    async def last_message(self, path: str) -> str | None:
        """The message of the newest commit that changed ``path`` (see
        :meth:`Mirror.last_message`), read on the Git thread between batches."""
        return await self._blocking(lambda: self.mirror.last_message(path))

    @property
    def tip(self) -> str | None:
        return self.mirror.tip

    @property
    def opened(self) -> bool:
        """Whether :meth:`open` has been called (and worked)."""
        return self.mirror.is_open

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s: writer stopped unexpectedly", self.name, exc_info=task.exception())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, change: FileChange | TreeChange) -> asyncio.Future[CommitOutcome]:
        """Queue a change; the future resolves once it is committed in the local mirror."""
        if not self.running:
            raise TemporaryError(f"{self.name}: writer is not running")
        for touched in self._watchers:  # before waiting for room: it is on its way already
            touched.add(change)
        done: asyncio.Future[CommitOutcome] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Change(change, done))
        return done

    def offer(self, change: FileChange | TreeChange) -> asyncio.Future[CommitOutcome]:
        """Queue a change at once, or raise TemporaryError when the queue is full: nothing
        can be queued between the caller's last look at :class:`Touched` and its change."""
        if not self.running:
            raise TemporaryError(f"{self.name}: writer is not running")
        done: asyncio.Future[CommitOutcome] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Change(change, done))
        except asyncio.QueueFull:
            raise TemporaryError(f"{self.name}: writer queue is full") from None
        for touched in self._watchers:
            touched.add(change)
        return done

    @contextlib.contextmanager
    def watching(self) -> Iterator[Touched]:
        """Record the changes submitted from now on, until the block ends."""
        touched = Touched()
        self._watchers.append(touched)
        try:
            yield touched
        finally:
            self._watchers.remove(touched)

    async def flush(self) -> int:
        """Commit everything queued so far and push it; returns the commits pushed."""
        if not self.running:
            raise TemporaryError(f"{self.name}: writer is not running")
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Flush(done))
        return await done

    async def close(self, *, push_until: float | None = None) -> None:
        """Commit what is queued, push, and stop; unpushed commits stay in the mirror.

        The push is tried once, or, with ``push_until`` (a time of the running loop: the
        stop's deadline), again after each failure of the remote until that time."""
        self._final_push_until = push_until
        if self.running:
            await self._queue.put(None)
            assert self._task is not None
            await self._task
        self._thread.shutdown(wait=False)
        if self._sender is not None:
            self._sender.shutdown(wait=False)

    async def _run(self) -> None:
        await self._sync()
        loop = asyncio.get_running_loop()
        while True:
            deadlines = [self._save_deadline] if self._save_deadline is not None else []
            if self._push_deadline is not None and self._pushing is None:
                deadlines.append(self._push_deadline)
            timeout = max(0.0, min(deadlines) - loop.time()) if deadlines else None
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                if self._save_deadline is not None and loop.time() >= self._save_deadline:
                    await self._save()
                else:
                    await self._push_soon()
                continue
            # Take what is already waiting (up to a limit) into one trip to the worker thread.
            batch: list[_Change] = []
            while isinstance(item, _Change):
                batch.append(item)
                if len(batch) >= BATCH_LIMIT or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._commit(batch)
            if isinstance(item, _Flush):
                await self._save()
                await self._settle()
                try:
                    item.done.set_result(await self._push())
                except AuditReverserError as exc:
                    item.done.set_exception(exc)
            elif item is None:
                await self._save()
                await self._settle()
                await self._final_push()
                return

    async def _commit(self, batch: list[_Change]) -> None:
        if self.fence is not None:
            try:
                await self.fence()
            except TemporaryError as exc:  # held: their events stay in the journal
                for entry in batch:
                    entry.done.set_exception(exc)
                return
        loop = asyncio.get_running_loop()
        if self._save_deadline is None:
            self._save_deadline = loop.time() + SAVE_DELAY_S
        self._unsaved_bytes += sum(_content_size(entry.change) for entry in batch)
        save = (
            len(self._unsaved) + len(batch) >= self._save_commits
            or self._unsaved_bytes >= SAVE_BYTES
            or loop.time() >= self._save_deadline
        )

        def commit_all() -> tuple[list[CommitOutcome | BaseException], bool, Exception | None]:
            results: list[CommitOutcome | BaseException] = []
            for entry in batch:
                change = entry.change
                made = None
                if isinstance(change, FileChange):
                    made = self._recovered.pop((change.message, change.path), None)
                if made is not None:
                    results.append(_Recovered(commit_id=made, writer=self.key))
                    continue
                try:
                    commit_id = self.mirror.commit(change)
                except Exception as exc:  # one bad change must not stop the others
                    results.append(exc)
                else:
                    files_set, files_removed = (
                        self.mirror.tree_counts if isinstance(change, TreeChange) else (0, 0)
                    )
                    results.append(
                        CommitOutcome(
                            commit_id=commit_id,
                            writer=self.key,
                            files_set=files_set,
                            files_removed=files_removed,
                        )
                    )
            if save or not self.mirror.unsaved:  # nothing new: answer them at once
                return results, True, self._save_mirror()
            return results, False, None

        results, saved, failed = await self._blocking(commit_all)
        self._unsaved += zip(batch, results, strict=True)
        if saved:
            self._answer(failed)
        now = loop.time()
        if self.mirror.unpushed and self._push_deadline is None:
            self._push_deadline = now + self.push_interval_s
        if self.mirror.unpushed >= self.push_max_commits and (
            self._queue.empty()
            or self.mirror.unpushed >= BACKLOG_PUSH_COMMITS
            or (self._push_deadline is not None and now >= self._push_deadline)
        ):
            await self._push_soon()

    def _save_mirror(self) -> Exception | None:
        """On the Git thread: save the mirror; a failure is returned, not raised."""
        try:
            self.mirror.save()
        except MirrorWriteFailed as exc:  # none of the unsaved commits is on the branch
            return exc
        return None

    async def _save(self) -> None:
        """Save the commits made since the last save and answer their changes."""
        if self._unsaved:
            self._answer(await self._blocking(self._save_mirror))

    def _answer(self, failed: Exception | None) -> None:
        """Answer the changes committed since the last save, which has just been made
        (``failed``: tried, and their commits are gone; their events stay in the journal)."""
        unsaved, self._unsaved = self._unsaved, []
        self._unsaved_bytes = 0
        self._save_deadline = None
        for entry, outcome in unsaved:
            result = outcome
            if (
                failed is not None
                and isinstance(outcome, CommitOutcome)
                and outcome.commit_id
                and not isinstance(outcome, _Recovered)
            ):
                result = failed
            if isinstance(result, BaseException):
                self.stats.failed += 1
                what = getattr(entry.change, "path", "a snapshot")
                log.error("%s: commit of %s failed: %s", self.name, what, result)
            elif isinstance(result, _Recovered):
                self.stats.recovered += 1
            elif result.commit_id is None:
                self.stats.unchanged += 1
            else:
                self.stats.commits += 1
            if entry.done.cancelled():  # its submitter stopped waiting (a shut-down)
                continue
            if isinstance(result, BaseException):
                entry.done.set_exception(result)
            else:
                entry.done.set_result(result)

    async def _push_soon(self) -> None:
        """Push: alongside the commits that go on meanwhile (a push to a server takes a
        round trip or several, and the server indexes the pack; commits waited for all of
        it), or here in HA, where a replica acknowledges entries by the pushed count and a
        push must be all that happens between two counts."""
        await self._save()  # the push would save them; answer their changes now
        if self.fence is not None:
            await self._try_push()
        elif self._pushing is None:
            self._pushing = asyncio.create_task(self._push_alongside(), name=f"push {self.name}")

    async def _push_alongside(self) -> None:
        try:
            await self._try_push(alongside=True)
        except Exception as exc:  # a bug: no one awaits this task to see it, so say it here
            log.exception("%s: push failed unexpectedly; trying again later", self.name)
            self.last_push_error = f"push failed unexpectedly: {exc}"
            self._push_deadline = asyncio.get_running_loop().time() + self._next_delay()
        finally:
            self._pushing = None
            with contextlib.suppress(asyncio.QueueFull):  # full: the writer wakes anyway
                self._queue.put_nowait(_WAKE)

    async def _settle(self) -> None:
        """Wait for a push made alongside the commits to end."""
        if self._pushing is not None:
            await self._pushing

    async def _push(self, *, alongside: bool = False) -> int:
        if not self.mirror.unpushed:
            self._push_deadline = None
            return 0
        if self.fence is not None:
            await self.fence()
        begin = time.monotonic()
        try:
            if alongside:
                pushed = await self._send_alongside()
            else:
                pushed = await self._blocking(self.mirror.push)
        except AuditReverserError as exc:
            self.stats.pushed_in(time.monotonic() - begin)
            self.stats.push_failures += 1
            self.last_push_error = str(exc)
            raise
        self.stats.pushed_in(time.monotonic() - begin)
        self.stats.pushes += 1
        self.stats.pushed_commits += pushed
        self.stats.last_push_at = datetime.now(UTC)
        self.last_push_error = None
        self._push_deadline = None
        if self.mirror.unpushed:  # made while this push was on its way
            # As after any commit batch: at once when maxCommits wait and nothing more is
            # queued; in a drain, at 1,024 commits (see _commit) or after the interval.
            now = asyncio.get_running_loop().time()
            soon = self.mirror.unpushed >= self.push_max_commits and self._queue.empty()
            self._push_deadline = now if soon else now + self.push_interval_s
        self._retry_s = RETRY_MIN_S
        log.info("%s: pushed %d commits", self.name, pushed)
        return pushed

    async def _send_alongside(self) -> int:
        """Push the commits saved so far from a thread of its own, while the Git thread
        goes on committing; what the mirror cannot push that way, it pushes on the Git
        thread (the remote moved: a replay; a remote for libgit2)."""
        plan = await self._blocking(self.mirror.begin_push)
        if plan is None:
            return await self._blocking(self.mirror.push)
        if self._sender is None:
            self._sender = GitThread(f"push {self.mirror.path.name}")
        sending = plan
        error: BaseException | None = None
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._sender, lambda: self.mirror.send(sending)
            )
        except Exception as exc:  # end_push decides what it means, on the Git thread
            error = exc
        if await self._blocking(lambda: self.mirror.end_push(sending, error)):
            return sending.commits
        return await self._blocking(self.mirror.push)

    def _next_delay(self) -> float:
        """Capped exponential back-off with jitter, so that many writers do not retry in step."""
        delay = self._retry_s * random.uniform(0.5, 1.0)
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
        return delay

    async def _try_push(self, *, alongside: bool = False) -> None:
        """Push, and on failure schedule a retry with back-off instead of raising."""
        with contextlib.suppress(AuditReverserError):
            await self._push(alongside=alongside)
            return
        delay = self._next_delay()
        log.warning(
            "%s: %s; %d commits kept locally, next try in %.1fs",
            self.name,
            self.last_push_error,
            self.mirror.unpushed,
            delay,
        )
        self._push_deadline = asyncio.get_running_loop().time() + delay

    async def _final_push(self) -> None:
        """The stop's push. A remote that is away or refuses for a moment (a server
        restarting, its branch locked by a push that a killed process left) is tried again
        until the stop's deadline, if there is one; what is not pushed by then stays in the
        mirror for the next start."""
        loop = asyncio.get_running_loop()
        until = self._final_push_until
        delay = FINAL_RETRY_MIN_S
        while True:
            try:
                await self._push()
                return
            except RemoteUnavailable as exc:
                error: AuditReverserError = exc
                if until is None or loop.time() + delay >= until:
                    break
            except AuditReverserError as exc:  # not the remote's doing (the lease lost)
                error = exc
                break
            log.warning(
                "%s: %s; %d commits not pushed yet, next try in %.2fs (stopping)",
                self.name,
                error,
                self.mirror.unpushed,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, FINAL_RETRY_MAX_S)
        log.warning(
            "%s: %s; %d commits stay in %s for the next start",
            self.name,
            error,
            self.mirror.unpushed,
            self.mirror.path,
        )
