"""A fleet whose rules are each cluster's own custom resources (``serve --cluster
NAME=KUBECONFIG``... without ``--config``; docs/fleet.md).

Each cluster's GitProviders, GitTargets, rules (and Flux GitRepositories, Secrets) are read
from its own API by a :class:`ClusterRules` of its own, and merged into one config whose
keys carry the cluster (``Key.cluster``), so that an event is routed by its own cluster's
rules only (``Config.by_cluster``). Status goes back to the cluster each object came from,
and each cluster's new GitTargets are snapshotted from its own API.

Two clusters' GitTargets that would write one repository folder (same remote, branch and
overlapping path) would overwrite each other's files: the one created later (by
``metadata.creationTimestamp``, which survives restarts) is refused, not ready with the
reason on its status, until the folder is free.

A cluster whose API does not answer at start does not hold the others up: the receiver
starts with the clusters that answered, and the missing one joins once listed. Until then
it is *waiting* (``Config.waiting``): its events are refused with 503 (the apiserver sends
them again) rather than routed by rules that are not known yet.

:class:`FolderFleet` is the other kind of fleet: rules from files serving every cluster,
each cluster's files in its own folder under each target, its objects from its own API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from audit_reverser.cluster.api import ApiUnavailable, KubeApi
from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.cluster.resync import ResyncResult
from audit_reverser.cluster.rules import ClusterRules, ObjectId
from audit_reverser.cluster.snapshot import SnapshotResult, SnapshotScheduler
from audit_reverser.cluster.status import FOLDER_IN_USE, State, StatusReporter
from audit_reverser.config.model import Config, GitTarget, Key
from audit_reverser.gitstore.transport import remote_key, scrub

log = logging.getLogger(__name__)

# How long the start waits for a cluster that has not answered at all yet (one that failed
# to answer is not waited for: the receiver starts without it).
START_WAIT_S = 60.0
JOIN_RETRY_S = 5.0

Resync = Callable[
    [list[GitTarget], KubeApi, ApiObjects], Awaitable[Mapping[Key, ResyncResult | Exception]]
]
Take = Callable[[GitTarget, KubeApi, ApiObjects], Awaitable[SnapshotResult | None]]


def _stamp(key: Key, cluster: str) -> Key:
    return dataclasses.replace(key, cluster=cluster)


def _unstamp(key: Key) -> Key:
    return dataclasses.replace(key, cluster="")


def stamped(config: Config, cluster: str) -> Config:
    """One cluster's config with every key naming the cluster (references follow, since
    they are made from the keys)."""
    return dataclasses.replace(
        config,
        providers={
            _stamp(k, cluster): dataclasses.replace(p, key=_stamp(p.key, cluster))
            for k, p in config.providers.items()
        },
        targets={
            _stamp(k, cluster): dataclasses.replace(t, key=_stamp(t.key, cluster))
            for k, t in config.targets.items()
        },
        watch_rules=tuple(
            dataclasses.replace(r, key=_stamp(r.key, cluster)) for r in config.watch_rules
        ),
        cluster_watch_rules=tuple(
            dataclasses.replace(
                r, key=_stamp(r.key, cluster), target_key=_stamp(r.target_key, cluster)
            )
            for r in config.cluster_watch_rules
        ),
        secrets={
            _stamp(k, cluster): dataclasses.replace(s, key=_stamp(s.key, cluster))
            for k, s in config.secrets.items()
        },
        origins={(kind, _stamp(k, cluster)): v for (kind, k), v in config.origins.items()},
    )


def _overlap(a: str, b: str) -> bool:
    """Whether one folder is the other or inside it ('' is the repository's root)."""
    a, b = a.strip("/"), b.strip("/")
    return not a or not b or a == b or a.startswith(f"{b}/") or b.startswith(f"{a}/")


def only(config: Config, cluster: str) -> Config:
    """The part of a merged config that is ``cluster``'s."""
    return dataclasses.replace(
        config, targets={k: t for k, t in config.targets.items() if k.cluster == cluster}
    )


class FleetRules:
    """Each cluster's rules from its own API, merged; a folder two clusters would share is
    the GitTarget's created first (on a tie, the one of the cluster named first)."""

    def __init__(self, apis: Mapping[str, KubeApi]) -> None:
        self.apis = dict(apis)
        self.objects = {name: ApiObjects(api) for name, api in apis.items()}
        self.rules = {name: ClusterRules(api) for name, api in apis.items()}
        self._configs: dict[str, Config] = {}
        self.clashes: dict[Key, str] = {}  # GitTargets refused, why
        self.on_change: Callable[[Config], Awaitable[None]] | None = None
        self._reporters: list[StatusReporter] = []
        self._schedulers: dict[str, SnapshotScheduler] = {}
        self._away: dict[str, str] = {}  # clusters whose rules are not read yet, why
        self._joins: list[asyncio.Task[None]] = []
        self._reporting: tuple[Callable[[], Awaitable[State]], Take] | None = None
        self.on_join: Callable[[str], None] | None = None
        self._last: Config | None = None  # the latest merged config

    async def start(self, wait_s: float = START_WAIT_S) -> Config:
        """Start watching every cluster; the first merged config, of the clusters listed
        once each has been listed or failed to answer (at most ``wait_s``). The others are
        waiting: they join when listed (see :meth:`join_away`)."""
        try:
            for rules in self.rules.values():
                rules.watch()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await asyncio.gather(*(rules.tried() for rules in self.rules.values()))
            for name, rules in self.rules.items():
                why = rules.away or f"its API did not answer within {wait_s:.0f}s"
                if rules.away is None and all(c.synced.is_set() for c in rules.collections):
                    try:
                        self._configs[name] = await rules.listed()
                    except ApiUnavailable as exc:  # listed, but its Secrets did not answer
                        why = str(exc)
                    else:
                        rules.on_change = self._changer(name)
                        continue
                self._away[name] = why
                log.error(
                    "cluster %s: rules not read: %s; starting without it, its events get "
                    "503 until they are (trying again in the background)",
                    name,
                    why,
                )
        except BaseException:
            await self.close()
            raise
        self._last = await asyncio.to_thread(self.merge)
        return self._last

    async def _join(self, name: str) -> None:
        """A cluster that was away at start: its rules once listed, then as for the others."""
        rules = self.rules[name]
        while True:
            try:
                config = await rules.listed()
                break
            except ApiUnavailable as exc:  # listed, but its Secrets could not be read
                self._away[name] = str(exc)
                await asyncio.sleep(JOIN_RETRY_S)
        log.info(
            "cluster %s: rules read (%d GitTargets); its events are taken from now on",
            name,
            len(config.targets),
        )
        del self._away[name]
        rules.on_change = changed = self._changer(name)
        await changed(config)
        if self._reporting is not None:  # else report() will, once this replica writes
            self._report_on(name)
        if self.on_join is not None:
            self.on_join(name)

    def _changer(self, name: str) -> Callable[[Config], Awaitable[None]]:
        async def changed(config: Config) -> None:
            self._configs[name] = config
            merged = await asyncio.to_thread(self.merge)  # normalizing local URLs reads disk
            self._last = merged
            if self.on_change is not None:
                await self.on_change(merged)
            for reporter in self._reporters:
                reporter.poke()
            for cluster, scheduler in self._schedulers.items():
                scheduler.update(only(merged, cluster))

        return changed

    def merge(self) -> Config:
        """Every cluster's rules in one config, without the GitTargets refused (and their
        rules). Blocking: local remote URLs are resolved on disk."""
        parts = [stamped(self._configs[name], name) for name in self.rules if name in self._configs]
        targets = {k: t for part in parts for k, t in part.targets.items()}
        providers = {k: p for part in parts for k, p in part.providers.items()}
        order = self._creation_order(targets)
        clashes: dict[Key, str] = {}
        kept: list[tuple[tuple[str, str], GitTarget]] = []
        for key in sorted(targets, key=order.__getitem__):
            target = targets[key]
            where = (remote_key(providers[target.provider_key].url), target.branch)
            holder = next(
                (
                    held
                    for place, held in kept
                    if place == where
                    and held.key.cluster != key.cluster
                    and _overlap(held.path, target.path)
                ),
                None,
            )
            if holder is None:
                kept.append((where, target))
                continue
            clashes[key] = (
                f"GitTarget {_unstamp(key)}: folder {target.path or '/'!r} of branch "
                f"{target.branch} of {scrub(providers[target.provider_key].url)} is written by "
                f"GitTarget {_unstamp(holder.key)} of cluster {holder.key.cluster} (folder "
                f"{holder.path or '/'!r}); give one of them another spec.path: "
                f"{FOLDER_IN_USE}"
            )
        for key, problem in clashes.items():
            if self.clashes.get(key) != problem:
                log.error("cluster %s: %s", key.cluster, problem)
        self.clashes = clashes
        accepted = {t.key for _, t in kept}
        return Config(
            providers=providers,
            targets={k: targets[k] for k in sorted(accepted, key=order.__getitem__)},
            watch_rules=tuple(
                r for part in parts for r in part.watch_rules if r.target_key in accepted
            ),
            cluster_watch_rules=tuple(
                r for part in parts for r in part.cluster_watch_rules if r.target_key in accepted
            ),
            secrets={k: s for part in parts for k, s in part.secrets.items()},
            sources=tuple(s for part in parts for s in part.sources),
            by_cluster=True,
            origins={k: v for part in parts for k, v in part.origins.items()},
            waiting={name: self._waiting_why(name) for name in self._away},
        )

    def _waiting_why(self, name: str) -> str:
        return f"the rules of cluster {name} are not read yet ({self._away[name]})"

    def _creation_order(self, targets: Mapping[Key, GitTarget]) -> dict[Key, tuple[str, int]]:
        """When each GitTarget was created (an apiserver always says; one that does not
        comes last), then the order of the clusters and of the targets in each."""
        created = {
            ("GitTarget", namespace, name, cluster): obj
            for cluster, rules in self.rules.items()
            for (kind, namespace, name), obj in rules.objects().items()
            if kind == "GitTarget"
        }
        found: dict[Key, tuple[str, int]] = {}
        for place, key in enumerate(targets):
            obj = created.get(("GitTarget", key.namespace, key.name, key.cluster)) or {}
            stamp = (obj.get("metadata") or {}).get("creationTimestamp")
            found[key] = (stamp if isinstance(stamp, str) and stamp else "~", place)
        return found

    @property
    def problems(self) -> list[str]:
        """Every cluster's broken objects, then the refused GitTargets, one line each."""
        found = [
            f"{problem} (cluster {name})"
            for name, rules in self.rules.items()
            for problem in rules.problems.values()
        ]
        return [
            *(
                f"Cluster {name}: {self._waiting_why(name)}; its events get 503 until they are"
                for name in self._away
            ),
            *found,
            *(f"{problem} (cluster {key.cluster})" for key, problem in self.clashes.items()),
        ]

    def problems_of(self, cluster: str) -> dict[ObjectId, str]:
        """The broken objects of one cluster, for its status."""
        found = dict(self.rules[cluster].problems)
        for key, problem in self.clashes.items():
            if key.cluster == cluster:
                found[("GitTarget", key.namespace, key.name)] = problem
        return found

    def report(
        self,
        state: Callable[[], Awaitable[State]],
        take: Take,
        config: Config,
    ) -> None:
        """Start writing each cluster's status to it and snapshotting its new GitTargets
        from its own API; a cluster away at start is reported on once it joins."""
        self._reporting = (state, take)
        for name in self.rules:
            if name not in self._away:
                self._report_on(name, config)

    def join_away(self) -> None:
        """Keep trying the clusters away at start, each joining (its events taken) once
        listed: on every replica, not only the one that writes, which receives too."""
        for name in list(self._away):
            join = asyncio.create_task(self._join(name), name=f"join {name}")
            join.add_done_callback(_join_ended)
            self._joins.append(join)

    def _report_on(self, name: str, config: Config | None = None) -> None:
        assert self._reporting is not None
        if name in self._schedulers:
            return  # already (it joined while report() ran)
        state, take = self._reporting
        rules = self.rules[name]
        reporter = StatusReporter(
            self.apis[name],
            rules,
            self._state_of(name, state),
            problems=lambda: self.problems_of(name),
        )
        reporter.start()
        self._reporters.append(reporter)
        scheduler = SnapshotScheduler(self.apis[name], rules, self._taker(name, take))
        scheduler.start()
        latest = config or self._last
        if latest is not None:
            scheduler.update(only(latest, name))
        self._schedulers[name] = scheduler

    def _taker(
        self, name: str, take: Take
    ) -> Callable[[GitTarget], Awaitable[SnapshotResult | None]]:
        async def run(target: GitTarget) -> SnapshotResult | None:
            return await take(target, self.apis[name], self.objects[name])

        return run

    def _state_of(
        self, name: str, state: Callable[[], Awaitable[State]]
    ) -> Callable[[], Awaitable[State]]:
        """The receiver's state as one cluster's status sees it: its own objects, by the
        keys its custom resources have."""

        def own(found: Mapping[Key, Any]) -> dict[Key, Any]:
            return {_unstamp(k): v for k, v in found.items() if k.cluster == name}

        async def view() -> State:
            whole = await state()
            return State(
                config=self._configs[name],
                keys=own(whole.keys),
                writers=own(whole.writers),
                health=own(whole.health),
                provider_problems=own(whole.provider_problems),
            )

        return view

    def source_of(self, target: GitTarget) -> tuple[KubeApi, ApiObjects]:
        """The API a GitTarget's objects are listed from (resyncs): its own cluster's."""
        return self.apis[target.key.cluster], self.objects[target.key.cluster]

    def grouped(
        self, targets: Iterable[GitTarget]
    ) -> list[tuple[KubeApi, ApiObjects, list[GitTarget]]]:
        """The targets by the cluster they are listed from, so that a resync lists each
        cluster once for all of its targets."""
        by_cluster: dict[str, list[GitTarget]] = {}
        for target in targets:
            by_cluster.setdefault(target.key.cluster, []).append(target)
        return [(*self.source_of(group[0]), group) for group in by_cluster.values()]

    async def resync(
        self, targets: Iterable[GitTarget], run: Resync
    ) -> dict[Key, ResyncResult | Exception]:
        """Each cluster's targets compared with its own API (one listing per cluster); a
        cluster that does not answer fails its own targets only."""
        return await _each_cluster(
            [(api, objects, group, group) for api, objects, group in self.grouped(targets)], run
        )

    async def stop_reporting(self) -> None:
        """Stop the status reports and snapshots (before the receiver they use stops)."""
        for join in self._joins:
            join.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await join
        self._joins.clear()
        for scheduler in self._schedulers.values():
            await scheduler.close()
        for reporter in self._reporters:
            await reporter.close()
        self._schedulers.clear()
        self._reporters.clear()

    async def close(self) -> None:
        await self.stop_reporting()
        for rules in self.rules.values():
            await rules.close()


def _join_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s stopped unexpectedly", task.get_name(), exc_info=task.exception())


async def _each_cluster(
    groups: Iterable[tuple[KubeApi, ApiObjects, list[GitTarget], list[GitTarget]]], run: Resync
) -> dict[Key, ResyncResult | Exception]:
    """``run`` for each cluster's targets (as given to it, then as reported), one cluster at
    a time; a listing that fails counts for that cluster's targets only."""
    results: dict[Key, ResyncResult | Exception] = {}
    for api, objects, given, reported in groups:
        try:
            found = await run(given, api, objects)
        except Exception as exc:  # that cluster did not answer; the others are compared
            found = {target.key: exc for target in given}
        keys = {g.key: r.key for g, r in zip(given, reported, strict=True)}
        results.update({keys[key]: result for key, result in found.items()})
    return results


class FolderFleet:
    """Rules from files serving several clusters (``serve --config`` with ``--cluster
    NAME=KUBECONFIG``...): cluster NAME's files go to ``<path>/NAME/`` under every target and
    its objects are read from its own API; so a resync compares each cluster's folder of
    each target with that cluster's API."""

    def __init__(self, apis: Mapping[str, KubeApi]) -> None:
        self.apis = dict(apis)
        self.objects = {name: ApiObjects(api) for name, api in apis.items()}

    def targets(self, config: Config) -> list[GitTarget]:
        """Every target once per cluster, as that cluster's files go to it; its key names
        the cluster too (``cluster:namespace/name`` in logs and metrics)."""
        return [
            dataclasses.replace(target, key=_stamp(key, name), cluster=name)
            for name in self.apis
            for key, target in config.targets.items()
        ]

    async def resync(
        self, targets: Iterable[GitTarget], run: Resync
    ) -> dict[Key, ResyncResult | Exception]:
        """Each cluster's folders compared with its own API, one listing per cluster for
        every target; ``run`` gets the targets under their own keys (their writers')."""
        by_cluster: dict[str, list[GitTarget]] = {}
        for target in targets:
            by_cluster.setdefault(target.cluster, []).append(target)
        return await _each_cluster(
            [
                (
                    self.apis[name],
                    self.objects[name],
                    [dataclasses.replace(t, key=_unstamp(t.key)) for t in group],
                    group,
                )
                for name, group in by_cluster.items()
            ],
            run,
        )
