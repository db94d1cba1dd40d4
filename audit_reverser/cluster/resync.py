"""Periodic resync: Git converges to the cluster even after events the apiserver dropped
(its buffer overflowed while we were away) or that never came (an audit policy gap).

At start and then every interval, the GitTargets' objects are listed as a snapshot lists
them (:func:`audit_reverser.cluster.snapshot.list_targets`: each resource once per run,
however many targets select it) and compared with each target's folder in one commit
``[RESYNC] <path>`` by the committer identity: files whose object differs are set,
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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from audit_reverser.cluster.api import KubeApi
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.snapshot import Listing, settled_listings
from audit_reverser.config.model import Config, GitTarget, Key
from audit_reverser.errors import TemporaryError
from audit_reverser.gitstore.types import CommitOutcome, Identity, TreeChange
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


async def resync_targets(
    *,
    api: KubeApi,
    objects: ApiObjects,
    config: Config,
    targets: Sequence[tuple[GitTarget, BranchWriter]],
    processor: Processor,
    committer: Identity,
) -> dict[Key, ResyncResult | Exception]:
    """Compare each target's folder with the cluster, one ``[RESYNC]`` commit per target
    that differs; the cluster is listed once for all of them. A target whose commit failed
    gets its exception; a listing the API cannot answer raises for all."""
    now = datetime.now(UTC)
    offered: dict[Key, tuple[Listing, asyncio.Future[CommitOutcome]]] = {}
    async with settled_listings(
        api=api,
        objects=objects,
        config=config,
        targets=targets,
        processor=processor,
        committer=committer,
        now=now,
    ) as listings:
        for target, writer in targets:
            listing = listings[target.key]
            objects_count = len(listing.files) + listing.left
            # A fleet's cluster folder under the target (rules from files): named too.
            folder = "/".join(p for p in (target.path, target.cluster) if p) or "/"
            cluster = f"Cluster: {target.cluster}\n" if target.cluster else ""
            offered[target.key] = (
                listing,
                writer.offer(
                    TreeChange(
                        files=listing.files,
                        prune=listing.folders,
                        keep=listing.keep,
                        message=f"[RESYNC] {folder}\n\n"
                        f"Objects: {objects_count}\nTarget: {target.key}\n{cluster}",
                        author=committer,
                        time=now,
                    )
                ),
            )
    results: dict[Key, ResyncResult | Exception] = {}
    for key, (listing, done) in offered.items():
        try:
            # Shielded: a resync cancelled at shut-down must not cancel the writer's future.
            outcome = await asyncio.shield(done)
        except Exception as exc:  # that target's writer failed; the others' did not
            results[key] = exc
            continue
        results[key] = ResyncResult(
            objects=len(listing.files) + listing.left,
            files_set=outcome.files_set,
            files_removed=outcome.files_removed,
            files_left=listing.left,
            commit_id=outcome.commit_id,
        )
    return results


class Resyncer:
    """Resyncs every GitTarget at start and then every ``interval_s`` (counted from the end
    of a run, so runs never overlap), in one named task."""

    def __init__(
        self,
        *,
        interval_s: float,
        targets: Callable[[], Iterable[GitTarget]],
        run: Callable[[list[GitTarget]], Awaitable[Mapping[Key, ResyncResult | Exception]]],
        stats: ResyncStats,
        retry_min_s: float = RETRY_MIN_S,
    ) -> None:
        self._interval_s = interval_s
        self._retry_min_s = retry_min_s
        self._targets = targets
        self._run = run
        self.stats = stats
        self._task: asyncio.Task[None] | None = None
        self._soon = asyncio.Event()

    def soon(self) -> None:
        """Run again now rather than after the interval (a fleet's cluster that came back
        may have missed changes while away)."""
        self._soon.set()

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
            self._soon.clear()
            if await self.run():
                retry_s = self._retry_min_s
                await self._pause(self._interval_s)
                continue
            delay = min(retry_s, self._interval_s) * random.uniform(0.5, 1.0)
            retry_s = min(retry_s * 2, self._interval_s)
            log.warning("resync: trying again in %.0fs", delay)
            await self._pause(delay)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._soon.wait()

    async def run(self) -> bool:
        """Resync every GitTarget once; False when some could not be."""
        begin = time.monotonic()
        done = failed = objects = commits = files_set = removed = left = 0
        targets = list(self._targets())
        try:
            results = await self._run(targets)
        except Exception as exc:  # the listing failed: no target could be compared
            results = {target.key: exc for target in targets}
        for target in targets:
            name = str(target.key)
            result = results.get(target.key)
            if result is None:  # its provider cannot be used: there is nothing to write to
                continue
            if isinstance(result, TemporaryError):
                failed += 1
                log.warning("resync of GitTarget %s: %s", name, result)
                continue
            if isinstance(result, Exception):  # a bug must not end the resyncs
                failed += 1
                log.error("resync of GitTarget %s failed", name, exc_info=result)
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
