"""Wiring: one settings object and a config in, running writers and intake out.

Targets that point at the same repository branch (by normalized URL) share one writer, so
their commits form one ordered history; its push policy is the most eager of its providers.

With a journal (``serve``), start-up recovers first: the intake reads the records the last
run accepted but did not commit from the journal before anything new, each writer learns
which of their commits it already made (see :meth:`BranchWriter.recover`), and the processor learns
the auditIDs already handled and the newest resourceVersions committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from audit_reverser.cluster.api import KubeApi
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.resync import ResyncResult, resync_targets
from audit_reverser.cluster.snapshot import SnapshotResult, snapshot
from audit_reverser.cluster.status import State
from audit_reverser.config.model import Config, GitTarget, Key, PushPolicy
from audit_reverser.encryption.keys import TargetKeys, fingerprint_key
from audit_reverser.encryption.keys import resolve as resolve_keys
from audit_reverser.errors import AuditReverserError, ConfigError, TemporaryError
from audit_reverser.events import EventKey
from audit_reverser.gitstore.health import probe
from audit_reverser.gitstore.repository import Mirror
from audit_reverser.gitstore.transport import install_trust, mirror_folder
from audit_reverser.gitstore.types import Identity
from audit_reverser.gitstore.writer import BranchWriter
from audit_reverser.ha.connection import Connection
from audit_reverser.ha.journal import RedisJournal
from audit_reverser.ha.lease import DEFAULT_LEASE_S
from audit_reverser.ha.stream import StaleWriter
from audit_reverser.ingest.intake import DEFAULT_MAX_BACKLOG, DEFAULT_WINDOW, Intake
from audit_reverser.journal import DEFAULT_MIN_FREE_BYTES, EventJournal, Journal, SegmentFile
from audit_reverser.pipeline.deletions import DeletionsStore
from audit_reverser.pipeline.deletions_file import DeletionsFile
from audit_reverser.pipeline.home import HomeCluster
from audit_reverser.pipeline.noise import Exclusions
from audit_reverser.pipeline.processor import Processor
from audit_reverser.pipeline.resolve import ObjectSource
from audit_reverser.pipeline.stats import PipelineStats
from audit_reverser.providers import CommitSigning, Remote, provider_remotes

log = logging.getLogger(__name__)

DEFAULT_COMMITTER = Identity(name="audit-reverser", email="audit-reverser@audit-reverser.invalid")


DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0
# A stop's last try to push starts at least this long before the shut-down time is over.
FINAL_PUSH_MARGIN_S = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    state_dir: Path
    committer: Identity = DEFAULT_COMMITTER
    # Only the embedded default creates a missing local remote: for a configured one, a
    # missing repository is far more likely a typo than a wish.
    create_local_remotes: bool = False
    # Events held in memory between the journal (or a replayed file) and the local commit;
    # a larger backlog waits on disk, in the journal.
    queue_size: int = DEFAULT_WINDOW
    # serve journals what it acknowledges; replay reads files that are their own record.
    journal: bool = False
    max_backlog: int = DEFAULT_MAX_BACKLOG
    journal_min_free_bytes: int = DEFAULT_MIN_FREE_BYTES
    # The journal's disk access; tests put a file here that fails like a full disk.
    journal_file: Callable[[Path], SegmentFile] = SegmentFile
    # serve --journal redis://…: the journal is in this Redis instead (ha.journal).
    redis_journal: Connection | None = None
    # How long the writer lease lasts without renewal (a standby takes over after it).
    journal_lease_s: float = DEFAULT_LEASE_S
    # How long close() may spend committing and pushing before it leaves the rest to the
    # journal; below Kubernetes' default 30 s grace period.
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    # serve: a stop's push that the remote refuses is tried again until the shut-down time is
    # over. replay and snapshot have pushed (their flush reports what failed) and exit.
    retry_push_at_stop: bool = False
    # Rules from files (True): a provider or key that cannot be used is an error at start,
    # and a key generateWhenMissing makes goes to the state directory. From a cluster
    # (False): such objects are left out, reported in their status, and a generated key goes
    # into the cluster Secret (cluster.rules).
    rules_from_files: bool = True
    # Rules from files: leave a provider whose credentials cannot be used, or a target whose
    # key cannot be read, out (logged, in readiness and metrics, in ``Runtime.problems``)
    # and run the rest, as rules from a cluster always do; False refuses to start.
    leave_out_broken: bool = False
    # Whose changes are not commits (see pipeline.noise); the defaults skip the control plane.
    exclusions: Exclusions = field(default_factory=Exclusions)


CHECKPOINT_INTERVAL_S = 0.2
# A writer taking over tries again after this long while Redis does not answer.
TAKE_OVER_RETRY_S = 2.0
# Commits a new writer reads from the remote's history beyond one per waiting event.
TAKE_OVER_HISTORY = 256
# How often a standby fetches the remotes, so that its mirrors are warm for a takeover.
WARM_INTERVAL_S = 60.0


def _broken_keys(config: Config, keys: Mapping[Key, TargetKeys]) -> list[str]:
    """Targets that ask for encryption whose key cannot be used (not those without any)."""
    return [
        found.problem
        for key, found in keys.items()
        if found.problem is not None
        and (target := config.targets.get(key)) is not None
        and target.encryption is not None
        and target.encryption.age_enabled
    ]


class Runtime:
    def __init__(
        self,
        config: Config,
        settings: Settings,
        *,
        source: ObjectSource | None = None,
        sources: Mapping[str, ObjectSource] | None = None,
        home: HomeCluster | None = None,
        problems: Sequence[str] = (),
    ) -> None:
        """``sources``: in a fleet, each cluster's API by name (instead of ``source``);
        ``home``: with one cluster's API (``source``), which cluster that is;
        ``problems``: objects the config left out (see :attr:`problems`)."""
        self.config = config
        self.settings = settings
        self.writers: dict[tuple[str, str], BranchWriter] = {}
        # What each writer signs with (fingerprints, committer): logged when it changes.
        self._signing: dict[str, tuple[frozenset[str], Identity]] = {}
        strict = settings.rules_from_files and not settings.leave_out_broken
        sinks, _ = self._wire(config, provider_remotes(config), strict=strict)
        self.sinks = sinks
        self.stats = PipelineStats()
        # Generated age keys and the fingerprint key live in the state directory: blocking
        # file access, as all of __init__ (callers build the runtime off the event loop).
        self.keys = self._resolve_keys(config, strict=strict)
        self.config_problems = list(problems)
        self._log_problems()
        self.processor = Processor(
            config,
            sinks,
            self.stats,
            keys=self.keys,
            fingerprint_key=fingerprint_key(settings.state_dir),
            source=source,
            sources=sources,
            home=home,
            exclusions=settings.exclusions,
        )
        self._deletions_saved = 0  # Deletions.changes when last saved
        # One save at a time: an older export must never land after a newer one.
        self._saving_deletions = asyncio.Lock()
        self.journal = (
            Journal(
                settings.state_dir / "journal",
                open_segment=settings.journal_file,
                min_free_bytes=settings.journal_min_free_bytes,
                before_checkpoint=self._save_deletions,
            )
            if settings.journal and settings.redis_journal is None
            else None
        )
        self.redis_journal = (
            RedisJournal(
                settings.redis_journal,
                # One name per state directory (locked by one process at a time).
                consumer=f"{socket.gethostname()}:{settings.state_dir.resolve()}",
                progress=self._push_progress,
                lease_s=settings.journal_lease_s,
                before_acknowledge=self._save_deletions,
            )
            if settings.redis_journal is not None
            else None
        )
        # serve keeps who asked for pending deletions across restarts (replay has no state):
        # in the state directory, or in Redis for the next writer when that is a cache.
        self.deletions_store: DeletionsStore | None = None
        if self.redis_journal is not None:
            self.deletions_store = self.redis_journal.deletions
        elif settings.journal:
            self.deletions_store = DeletionsFile(settings.state_dir)
        intake_journal: EventJournal | None = self.redis_journal or self.journal
        self.intake = Intake(
            self.processor,
            journal=intake_journal,
            window=settings.queue_size,
            max_backlog=settings.max_backlog,
        )
        self.accepting = False
        self._lock: int | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._leading: asyncio.Task[None] | None = None
        # HA: the writers caught up with their remote since this replica leads (or doing so).
        self._caught_up: set[str] = set()

    def _push_progress(self) -> dict[str, tuple[int, int]]:
        return {w.key: (w.stats.pushed_commits, w.mirror.unpushed) for w in self.writers.values()}

    def _wire(
        self,
        config: Config,
        remotes: Mapping[Key, Remote | ConfigError],
        *,
        strict: bool,
    ) -> tuple[dict[Key, BranchWriter], list[BranchWriter]]:
        """The writer of each target, made for (remote, branch) pairs seen for the first time;
        returns the sinks and the new writers. Targets that share a repository branch share a
        writer, whose push policy is the most eager of their providers'. Not strict (rules
        from a cluster): a provider whose credentials are unusable leaves its targets out."""
        sinks: dict[Key, BranchWriter] = {}
        policies: dict[tuple[str, str], list[PushPolicy]] = {}
        signings: dict[tuple[str, str], dict[Key, CommitSigning]] = {}
        new: list[BranchWriter] = []
        self.provider_problems: dict[Key, str] = {}
        for target in config.targets.values():
            provider = config.providers[target.provider_key]
            remote = remotes[provider.key]
            if isinstance(remote, ConfigError):
                if strict:
                    raise remote
                log.error("GitTarget %s left out: %s", target.key, remote)
                self.provider_problems[provider.key] = config.located(
                    provider.kind, provider.key, str(remote)
                )
                continue
            transport = remote.transport
            key = (remote.key, target.branch)
            policies.setdefault(key, []).append(provider.push)
            signings.setdefault(key, {})[provider.key] = remote.signing
            writer = self.writers.get(key)
            if writer is None:
                mirror = Mirror(
                    self.settings.state_dir / "mirrors" / mirror_folder(remote.key, target.branch),
                    transport,
                    target.branch,
                    self.settings.committer,
                    create_local_remote=self.settings.create_local_remotes,
                )
                writer = BranchWriter(
                    mirror,
                    push_interval_s=0,
                    push_max_commits=1,
                    queue_size=self.settings.queue_size,
                )
                self.writers[key] = writer
                new.append(writer)
            else:
                writer.mirror.transport = transport  # a rotated token or deploy key
            sinks[target.key] = writer
        for key, found in policies.items():
            self.writers[key].push_interval_s = min(p.interval_s for p in found)
            self.writers[key].push_max_commits = min(p.max_commits for p in found)
            self._sign_with(self.writers[key], signings[key])
        return sinks, new

    def _sign_with(self, writer: BranchWriter, signings: Mapping[Key, CommitSigning]) -> None:
        """Give the writer its committer and signing key (a rotated key too). Providers
        sharing a repository branch share one history: a signing provider wins over one
        that does not sign (nothing unsigned once one signs), then the first by name."""
        chosen_key = min(signings, key=lambda k: (signings[k].key is None, str(k)))
        chosen = signings[chosen_key]
        committer = chosen.committer or self.settings.committer
        writer.mirror.committer = committer
        writer.mirror.signer = chosen.key.sign if chosen.key is not None else None
        fingerprints = frozenset(s.key.fingerprint for s in signings.values() if s.key)
        if self._signing.get(writer.key, (frozenset(), committer)) == (fingerprints, committer):
            return  # rules are rebuilt every minute in a cluster: say it once
        self._signing[writer.key] = (fingerprints, committer)
        if chosen.key is not None:
            log.info(
                "%s: signing commits with %s as %s <%s>",
                writer.name,
                chosen.key.fingerprint,
                committer.name,
                committer.email,
            )
        if len(fingerprints) > 1:
            log.warning(
                "%s: GitProviders %s sign with different keys; commits are signed with the "
                "key of %s",
                writer.name,
                ", ".join(sorted(map(str, signings))),
                chosen_key,
            )

    def _resolve_keys(self, config: Config, *, strict: bool) -> dict[Key, TargetKeys]:
        keys = {}
        for target in config.targets.values():
            try:
                keys[target.key] = resolve_keys(
                    target,
                    config.secrets,
                    self.settings.state_dir,
                    generate_locally=self.settings.rules_from_files,
                )
            except ConfigError as exc:
                if strict:
                    raise
                keys[target.key] = TargetKeys(
                    problem=config.located("GitTarget", target.key, str(exc))
                )
        return keys

    @property
    def problems(self) -> list[str]:
        """Why objects are left out or cannot do all their work, one line each: the
        config's problems (references, allowed branches), providers whose credentials
        cannot be used, targets whose encryption key cannot be read."""
        return [
            *self.config_problems,
            *self.provider_problems.values(),
            *_broken_keys(self.config, self.keys),
        ]

    def _log_problems(self) -> None:
        # Rules from a cluster log their own problems as they change (cluster.rules).
        for problem in self.config_problems if self.settings.rules_from_files else ():
            log.error("left out: %s", problem)
        for problem in _broken_keys(self.config, self.keys):
            log.error("Secrets are not written: %s", problem)

    async def reconfigure(self, config: Config, problems: Sequence[str] = ()) -> None:
        """Route by ``config`` from now on (rules changed in the cluster; ``problems``: the
        objects left out). Events being processed finish with the rules they started with;
        none is dropped. Writers of repository branches no longer used keep running: they
        may hold unpushed commits."""
        keys = await asyncio.to_thread(self._resolve_keys, config, strict=False)
        remotes = await asyncio.to_thread(provider_remotes, config)  # local paths: file access
        sinks, new = self._wire(config, remotes, strict=False)
        for writer in new:
            await writer.open()
            if self.journal is not None:
                self.journal.set_tips({writer.key: writer.tip})
            if self.redis_journal is None:
                writer.start()
        if self.redis_journal is not None and self.redis_journal.leading.is_set():
            await self._catch_up(new, self.redis_journal)
        await asyncio.to_thread(
            install_trust,
            self.settings.state_dir / "trust",
            [w.mirror.transport for w in self.writers.values()],
        )
        self.processor.reconfigure(config, sinks, keys)
        self.sinks = sinks
        self.keys = keys
        self.config = config
        self.config_problems = list(problems)
        log.info(
            "rules changed: %d targets, %d repository branches (%d new)",
            len(sinks),
            len(self.writers),
            len(new),
        )

    async def take_snapshot(
        self, target: GitTarget, api: KubeApi, objects: ApiObjects
    ) -> SnapshotResult | None:
        """Snapshot and prune ``target`` (see :mod:`audit_reverser.cluster.snapshot`); None
        when it has no writer (its provider cannot be used)."""
        writer = self.sinks.get(target.key)
        if writer is None:
            return None
        return await snapshot(
            api=api,
            objects=objects,
            config=self.config,
            target=target,
            processor=self.processor,
            writer=writer,
            committer=writer.mirror.committer,
        )

    async def resync(
        self, targets: Iterable[GitTarget], api: KubeApi, objects: ApiObjects
    ) -> dict[Key, ResyncResult | Exception]:
        """Compare the targets' folders with the cluster, listed once for all of them (see
        :mod:`audit_reverser.cluster.resync`); a target without a writer (its provider
        cannot be used) is left out of the result."""
        pairs = [(t, self.sinks[t.key]) for t in targets if t.key in self.sinks]
        return await resync_targets(
            api=api,
            objects=objects,
            config=self.config,
            targets=pairs,
            processor=self.processor,
            committer=self.settings.committer,
        )

    async def status_state(self) -> State:
        """What the status of the custom resources is made from; probes each provider's
        remote (reachable, authenticated, may push), without pushing anything."""
        probes = {}
        for target_key, writer in self.sinks.items():
            provider_key = self.config.targets[target_key].provider_key
            if provider_key not in probes:
                probes[provider_key] = asyncio.to_thread(
                    probe, writer.mirror.transport, writer.mirror.branch
                )
        health = dict(zip(probes, await asyncio.gather(*probes.values()), strict=True))
        return State(
            config=self.config,
            keys=self.keys,
            writers=self.sinks,
            health=health,
            provider_problems=dict(self.provider_problems),
        )

    async def start(self) -> None:
        await asyncio.to_thread(self._lock_state_dir)
        await asyncio.to_thread(
            install_trust,
            self.settings.state_dir / "trust",
            (w.mirror.transport for w in self.writers.values()),
        )
        results = await asyncio.gather(
            *(w.open() for w in self.writers.values()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(w.close() for w in self.writers.values()))
            self._unlock_state_dir()
            raise errors[0]
        if self.redis_journal is not None:
            try:
                await self.redis_journal.open()
            except BaseException:
                await asyncio.gather(*(w.close() for w in self.writers.values()))
                self._unlock_state_dir()
                raise
        if self.journal is not None:
            await self._restore_deletions()  # with Redis, the writer loads them (_lead)
            await self._recover(self.journal)
        if self.deletions_store is not None:
            self._checkpoints = asyncio.create_task(
                self._checkpoint_loop(self.journal), name="journal-checkpoints"
            )
        if self.redis_journal is None:
            for writer in self.writers.values():
                writer.start()
        else:
            self._leading = asyncio.create_task(
                self._lead(self.redis_journal), name="journal writer lease"
            )
        self.intake.start()
        self.accepting = True

    @property
    def leads(self) -> bool:
        """Whether this replica does what one replica at a time may do (write Git, patch
        statuses, take snapshots, resync): always without a shared journal; with one, while
        it holds the writer lease."""
        return self.redis_journal is None or self.redis_journal.writing

    async def until_leading(self) -> None:
        """Return once this replica writes (see :attr:`leads`); never, while a standby."""
        if self.redis_journal is not None:
            await self.redis_journal.until_writing()

    async def _lead(self, journal: RedisJournal) -> None:
        """A standby until this replica holds the writer lease; then each writer catches up
        with the remote, and the intake starts reading the shared journal."""
        warming = asyncio.create_task(self._keep_warm(), name="standby mirrors")
        await journal.leading.wait()
        warming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warming
        try:
            await self._restore_deletions()
            # Writers that reconfigure() has not opened yet: it catches them up once opened.
            await self._catch_up([w for w in self.writers.values() if w.opened], journal)
            while True:
                try:
                    await journal.lead()
                    break
                except StaleWriter:
                    raise
                except TemporaryError as exc:  # Redis away: the lease keeps, or is lost
                    log.error("journal: %s (taking over again once Redis answers)", exc)
                    await journal.until_available()
        except StaleWriter as exc:  # lost before it started: exits like any other loss
            log.error("%s", exc)
            journal.lost.set()
        except Exception:  # e.g. Redis refusing us, a broken mirror: held, it would block all
            log.critical(
                "journal: taking over as the writer failed; this replica gives the lease up "
                "and starts again as a standby",
                exc_info=True,
            )
            journal.lost.set()

    async def _keep_warm(self) -> None:
        """A standby fetches each remote now and then: a takeover then fetches only what is
        new, instead of the whole repository into an empty state directory."""
        while True:
            for writer in list(self.writers.values()):
                try:
                    await writer.warm()
                except AuditReverserError as exc:  # the writer tries again at its takeover
                    log.warning("%s: %s", writer.name, exc)
            await asyncio.sleep(WARM_INTERVAL_S)

    async def _catch_up(self, writers: Iterable[BranchWriter], journal: RedisJournal) -> None:
        """Catch each writer up with its remote, side by side, unless it is (being) caught
        up already: :meth:`_lead` and :meth:`reconfigure` may both come to a new writer."""
        fresh = [w for w in writers if w.key not in self._caught_up]
        self._caught_up.update(w.key for w in fresh)
        await asyncio.gather(*(self._take_over(w, journal) for w in fresh))

    async def _take_over(self, writer: BranchWriter, journal: RedisJournal) -> None:
        """Fence the writer by the lease, drop what its mirror did not push and learn the
        remote's history (retried while Redis does not answer; a remote that does not
        answer is the writer's to wait for), then start it."""
        writer.fence = journal.fence
        writer.mirror.fence = journal.lease.assert_held
        while True:
            await journal.fence()
            try:
                # Commits of the events still in the stream are among the newest: one per
                # event at most, besides snapshots, resyncs and other pushers' commits.
                history = await journal.lane.length() + TAKE_OVER_HISTORY
                found = await writer.take_over(history)
                break
            except TemporaryError as exc:
                log.error("%s: %s; trying again in %.0fs", writer.name, exc, TAKE_OVER_RETRY_S)
                await asyncio.sleep(TAKE_OVER_RETRY_S)
        self.processor.recall_versions(writer, found)
        writer.start()

    async def _recover(self, journal: Journal) -> None:
        recovery = await asyncio.to_thread(journal.recover)
        self.processor.remember(EventKey(key) for key in recovery.handled)
        known = recovery.tips
        if recovery.pending:
            for writer in self.writers.values():
                if known is None or writer.key in known:
                    # No checkpoint at all (lost or damaged): read each whole history.
                    since = known[writer.key] if known is not None else None
                    found = await writer.recover(since)
                    self.processor.recall_versions(writer, found)
        # A writer the checkpoint does not know holds no commit of a pending record; from
        # here on, commits on it are found from its present tip. Without any checkpoint
        # but with pending records, only a whole-history scan (None) stays correct until
        # the records are done.
        whole_history = known is None and bool(recovery.pending)
        journal.set_tips(
            {
                w.key: None if whole_history else w.tip
                for w in self.writers.values()
                if known is None or w.key not in known
            }
        )
        await journal.checkpoint()

    async def _checkpoint_loop(self, journal: Journal | None) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            try:
                # The journal is in Redis: the writer saves the deletions (also requests no
                # rule selects, which no acknowledgement saves); a standby may not.
                if journal is None:
                    if self.leads:
                        await self._save_deletions()
                    continue
                await journal.look_at_disk()
                await journal.checkpoint()
            except (OSError, AuditReverserError) as exc:  # saved on the next round
                log.error("journal checkpoint failed: %s", exc)

    async def _restore_deletions(self) -> None:
        """Take back who asked for pending deletions: at the start with the file journal,
        when this replica becomes the writer with Redis (tried until Redis answers: a
        writer without them would finish those deletions in the controllers' names)."""
        store = self.deletions_store
        if store is None:
            return
        while True:
            try:
                saved = await store.load()
                break
            except StaleWriter:
                raise
            except AuditReverserError as exc:
                log.error("%s; trying again in %.0fs", exc, TAKE_OVER_RETRY_S)
                await asyncio.sleep(TAKE_OVER_RETRY_S)
        if saved is None:
            return
        try:
            self.processor.deletions.restore(saved, time.time())
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            try:
                await store.set_aside(f"is damaged ({exc!r})")
            except AuditReverserError as failed:  # the next save replaces them anyway
                log.error("%s", failed)
            return
        self._deletions_saved = self.processor.deletions.changes

    async def _save_deletions(self) -> None:
        """Save who asked for pending deletions when that changed (the journal calls this
        before each checkpoint, the Redis journal before it acknowledges entries: an event
        counted as done never takes its request along)."""
        deletions, store = self.processor.deletions, self.deletions_store
        if store is None:
            return
        async with self._saving_deletions:
            if deletions.changes == self._deletions_saved:
                return
            changes = deletions.changes
            await store.save(deletions.export(time.time()))
            self._deletions_saved = changes

    def _lock_state_dir(self) -> None:
        """One process per state directory: two would interleave journals and mirrors."""
        directory = self.settings.state_dir
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditReverserError(
                f"state directory {directory} is in use by another audit-reverser process"
            ) from None
        self._lock = fd

    def _unlock_state_dir(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the lock
            self._lock = None

    def ready(self) -> bool:
        return all(ok for _, ok, _ in self.readiness() if ok is not None)

    def waiting_for(self, cluster: str) -> str | None:
        """Why events posted under ``cluster`` cannot be taken yet: a fleet's cluster whose
        rules are not read (the rules events are routed by: none is taken before them)."""
        return self.config.waiting.get(cluster)

    def readiness(self) -> list[tuple[str, bool | None, str]]:
        """What /readyz checks: (name, passed, detail). Remotes are reported with None: an
        unreachable remote does not make us unready, because commits wait in the mirror
        while a pod that is not ready leaves the Service, and the apiserver then drops
        events once its buffer is full."""
        journal = self.redis_journal or self.journal
        problem = journal.unwritable if journal is not None else None
        checks: list[tuple[str, bool | None, str]] = [
            ("started", self.accepting, "" if self.accepting else "starting or stopping"),
            ("pipeline", self.intake.running, ""),
            ("journal", problem is None, problem or ""),
        ]
        # A broken object is reported, not a reason to refuse events: the healthy targets
        # keep working, and refused batches would be lost once the apiserver's buffer fills.
        checks.extend(("config", None, problem) for problem in self.problems)
        if not self.leads:  # a standby: its writers wait for the lease (and must)
            checks.append(("writers", None, "standby: another replica holds the writer lease"))
        for writer in self.writers.values() if self.leads else ():
            checks.append((f"writer {writer.name}", writer.running, ""))
            if writer.last_push_error is not None:
                waiting = f"{writer.mirror.unpushed} commits wait in the mirror"
                detail = f"last push failed ({waiting}): {writer.last_push_error}"
                checks.append((f"remote {writer.name}", None, detail))
        return checks

    async def flush(self) -> list[str]:
        """Hand every queued event to Git and push; returns one line per failed push."""
        await self.intake.drain()
        failures = []
        for writer in self.writers.values():
            try:
                await writer.flush()
            except AuditReverserError as exc:
                failures.append(
                    f"{exc} ({writer.mirror.unpushed} commits kept in {writer.mirror.path})"
                )
        return failures

    async def close(self) -> None:
        """Stop accepting, commit what was accepted and push (see ``retry_push_at_stop``),
        within the shut-down time; what is left then stays in the journal (and unpushed
        commits in the mirrors)."""
        self.accepting = False
        if self._leading is not None:
            if self.redis_journal is not None and self.redis_journal.leading.is_set():
                # Holding the lease, its takeover still under way (Redis was away): let it
                # finish, so that what this replica accepted is written now.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.shield(self._leading), self.settings.shutdown_timeout_s / 2
                    )
            self._leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._leading
        if not self.leads:
            # A standby has nothing to finish (what it accepted is in Redis, for the writer);
            # a writer that lost its lease may finish nothing.
            await self.intake.stop()
            await asyncio.gather(*(w.close() for w in self.writers.values()))
        else:
            await self._finish_in_time()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
        if self.journal is not None:
            await self.journal.close()
        elif self.leads:  # a writer that lost its lease may not save
            try:
                await self._save_deletions()
            except (OSError, AuditReverserError) as exc:
                log.error("%s", exc)
        if self.redis_journal is not None:
            await self.redis_journal.close()
        self._unlock_state_dir()

    async def _finish_in_time(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout_s
        try:
            await asyncio.wait_for(self._finish(deadline), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.warning(
                "shut-down time (%.0fs) is over: %d events stay in the journal and %d commits "
                "in the mirrors, for the next start",
                self.settings.shutdown_timeout_s,
                self.intake.journal.backlog if self.intake.journal is not None else 0,
                sum(w.mirror.unpushed for w in self.writers.values()),
            )
            await self.intake.stop()

    async def _finish(self, deadline: float) -> None:
        await self.intake.close()
        # A push that fails is tried again until a little before the deadline, so that the
        # last try's warning is logged, not cut short.
        until = deadline - FINAL_PUSH_MARGIN_S if self.settings.retry_push_at_stop else None
        await asyncio.gather(*(w.close(push_until=until) for w in self.writers.values()))
