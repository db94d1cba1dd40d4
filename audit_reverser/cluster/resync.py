"""Periodic resync: Git converges to the cluster even after events the apiserver dropped
(its buffer overflowed while we were away) or that never came (an audit policy gap).

At start and then every interval, each GitTarget's objects are listed as a snapshot lists
them (:func:`audit_reverser.cluster.snapshot.list_target`) and compared with its folder in
one commit ``[RESYNC] <path>`` by the committer identity: files whose object differs are set,
files of objects that are gone (in the folders the rules cover) are removed; when nothing
differs there is no commit. What events change while a target is listed is left to them
(:meth:`Listing.settle`), so a resync never regresses a newer file. One task runs the
resyncs, one at a time; a run the API cannot answer is tried again with capped back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from audit_reverser.cluster.api import KubeApi
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.snapshot import list_target
from audit_reverser.config.model import Config, GitTarget
from audit_reverser.errors import TemporaryError
from audit_reverser.gitstore.types import Identity, TreeChange
from audit_reverser.gitstore.writer import BranchWriter
from audit_reverser.pipeline.processor import Processor

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 600.0
# A failed run is tried again sooner than the interval: 5 s doubling, capped at the interval.
RETRY_MIN_S = 5.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ResyncResult:
    objects: int  # objects the rules select
    files_set: int  # files the commit wrote (new or different)
    files_removed: int  # files of objects that are gone
    files_left: int  # files changes made during the listing; left to them
    commit_id: str | None  # None: nothing differed


@dataclass(kw_only=True, slots=True)
class ResyncStats:
    """What ``/metrics`` shows of the resyncs; per GitTarget (``namespace/name``) counts."""

    runs_ok: int = 0
    runs_failed: int = 0  # runs in which some GitTarget could not be resynced
    last_ok_at: datetime | None = None  # end of the last run that resynced every GitTarget
    commits: Counter[str] = field(default_factory=Counter)
    files_set: Counter[str] = field(default_factory=Counter)
    files_removed: Counter[str] = field(default_factory=Counter)
    files_left: Counter[str] = field(default_factory=Counter)


async def resync_target(
    *,
    api: KubeApi,
    objects: ApiObjects,
    config: Config,
    target: GitTarget,
    processor: Processor,
    writer: BranchWriter,
    committer: Identity,
) -> ResyncResult:
    """Compare the target's folder with the cluster; one ``[RESYNC]`` commit when it differs."""
    now = datetime.now(UTC)
    with writer.watching() as touched:
        listed = await list_target(
            api=api,
            objects=objects,
            config=config,
            target=target,
            processor=processor,
            committer=committer,
            now=now,
        )
        # From here to the offer nothing awaits: no change can slip in between.
        listing = listed.settle(touched, processor, writer)
        done = writer.offer(
            TreeChange(
                files=listing.files,
                prune=listing.folders,
                keep=listing.keep,
                message=f"[RESYNC] {target.path or '/'}\n\n"
                f"Objects: {len(listed.files)}\nTarget: {target.key}\n",
                author=committer,
                time=now,
            )
        )
        # Events older than what the resync writes must not bring the old state back.
        processor.remember_versions(writer, listing.versions)
    # Shielded: a resync cancelled at shut-down must not cancel the writer's future.
    outcome = await asyncio.shield(done)
    return ResyncResult(
        objects=len(listed.files),
        files_set=outcome.files_set,
        files_removed=outcome.files_removed,
        files_left=listing.left,
        commit_id=outcome.commit_id,
    )


class Resyncer:
    """Resyncs every GitTarget at start and then every ``interval_s`` (counted from the end
    of a run, so runs never overlap), in one named task."""

    def __init__(
        self,
        *,
        interval_s: float,
        targets: Callable[[], Iterable[GitTarget]],
        run: Callable[[GitTarget], Awaitable[ResyncResult | None]],
        stats: ResyncStats,
        retry_min_s: float = RETRY_MIN_S,
    ) -> None:
        self._interval_s = interval_s
        self._retry_min_s = retry_min_s
        self._targets = targets
        self._run = run
        self.stats = stats
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="resync")
        self._task.add_done_callback(_stopped)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        retry_s = self._retry_min_s
        while True:
            if await self.run():
                retry_s = self._retry_min_s
                await asyncio.sleep(self._interval_s)
                continue
            delay = min(retry_s, self._interval_s) * random.uniform(0.5, 1.0)
            retry_s = min(retry_s * 2, self._interval_s)
            log.warning("resync: trying again in %.0fs", delay)
            await asyncio.sleep(delay)

    async def run(self) -> bool:
        """Resync every GitTarget once; False when some could not be."""
        begin = time.monotonic()
        done = failed = objects = commits = files_set = removed = left = 0
        for target in list(self._targets()):
            name = str(target.key)
            try:
                result = await self._run(target)
            except TemporaryError as exc:
                failed += 1
                log.warning("resync of GitTarget %s: %s", name, exc)
                continue
            except Exception:  # a bug must not end the resyncs of every target
                failed += 1
                log.exception("resync of GitTarget %s failed", name)
                continue
            if result is None:  # its provider cannot be used: there is nothing to write to
                continue
            done += 1
            objects += result.objects
            files_set += result.files_set
            removed += result.files_removed
            left += result.files_left
            commits += result.commit_id is not None
            self.stats.commits[name] += result.commit_id is not None
            self.stats.files_set[name] += result.files_set
            self.stats.files_removed[name] += result.files_removed
            self.stats.files_left[name] += result.files_left
        if failed:
            self.stats.runs_failed += 1
        else:
            self.stats.runs_ok += 1
            self.stats.last_ok_at = datetime.now(UTC)
        log.info(
            "resync: %d GitTargets (%d failed), %d objects, %d files updated, %d removed, "
            "%d left to newer changes, %d commits, %.1fs",
            done,
            failed,
            objects,
            files_set,
            removed,
            left,
            commits,
            time.monotonic() - begin,
        )
        return not failed


def _stopped(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("resync stopped unexpectedly", exc_info=task.exception())
