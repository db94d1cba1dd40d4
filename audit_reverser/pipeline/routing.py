"""Which GitTargets an event goes to, by the WatchRules and ClusterWatchRules.

The matching follows the seed's CRD documentation (admission-webhook style): empty lists and
``*`` match all; resources are case-insensitive plural names, ``name/*`` (all subresources
of ``name``), ``*/sub`` and ``name/sub``, or a group-qualified ``plural.group`` for custom
resources. A WatchRule selects namespaced objects in its own namespace only.

When the rules serve several clusters (``Config.cluster_folders``), the target of a route
carries the event's cluster name, so that its files go to that cluster's folder. A receiver
that is one cluster's (a :class:`HomeCluster`) does the same for every other cluster's events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from audit_reverser.config.model import Config, GitTarget, Key, Operation, ResourceRule, Scope
from audit_reverser.events import AuditEvent, ObjectRef
from audit_reverser.pipeline.home import HomeCluster
from audit_reverser.pipeline.noise import Exclusions

VERB_OPERATIONS: dict[str, Operation] = {
    "create": "CREATE",
    "update": "UPDATE",
    "patch": "UPDATE",
    "delete": "DELETE",
    "deletecollection": "DELETE",
}

# Answers the router remembers (bounded: emptied when full). Events come in runs of the same
# kind of object, and without rules that exclude users or tools the answer depends only on
# the reference's kind, namespace and the verb: the rules are matched once per such key.
MEMO_LIMIT = 4096

# Writes through these subresources change the parent object's own spec, so a rule that
# selects the parent selects them too (``kubectl scale`` must show up in a deployments rule).
PARENT_WRITING_SUBRESOURCES = frozenset({"scale", "ephemeralcontainers", "resize"})


def is_cluster_scoped(ref: ObjectRef) -> bool:
    # The apiserver puts a Namespace's own name into objectRef.namespace for
    # /api/v1/namespaces/{name}, so namespaces are recognised by resource, not by that field.
    return not ref.namespace or (ref.api_group == "" and ref.resource == "namespaces")


@dataclass(frozen=True, kw_only=True, slots=True)
class Route:
    target: GitTarget
    explicit: bool  # False when only a wildcard resource pattern selected the event


def _matches_list(values: tuple[str, ...], value: str) -> bool:
    return not values or "*" in values or value in values


def _resource_match(pattern: str, ref: ObjectRef, via_parent: bool) -> bool:
    resource, sub = ref.resource.lower(), ref.subresource.lower()
    name, _, pattern_sub = pattern.partition("/")
    if pattern_sub:
        return (name in ("*", resource)) and pattern_sub in ("*", sub) and bool(sub)
    if sub and not via_parent:
        return False
    return name in ("*", resource, f"{resource}.{ref.api_group}")


def _rule_matches(rule: ResourceRule, ref: ObjectRef, operation: Operation) -> bool | None:
    """None when the rule does not match; else whether it named the resource explicitly."""
    if operation not in rule.operations:
        return None
    if not _matches_list(rule.api_groups, ref.api_group):
        return None
    if not _matches_list(rule.api_versions, ref.api_version):
        return None
    via_parent = ref.subresource.lower() in PARENT_WRITING_SUBRESOURCES
    explicit: bool | None = None
    for pattern in rule.resources:
        if _resource_match(pattern, ref, via_parent):
            named = not pattern.startswith("*")
            explicit = named if explicit is None else explicit or named
    return explicit


class Router:
    """Answers 'which targets, and was it asked for by name?' for one object reference."""

    def __init__(self, config: Config, home: HomeCluster | None = None) -> None:
        # Keyed by (cluster, namespace) and cluster: the cluster is '' unless the rules are
        # several clusters' own (Config.by_cluster), where each cluster has its own rules.
        self._namespaced: dict[
            tuple[str, str], list[tuple[tuple[ResourceRule, ...], GitTarget, Exclusions | None]]
        ] = {}
        self._cluster: dict[str, list[tuple[ResourceRule, GitTarget, Exclusions | None]]] = {}
        self._by_cluster = config.by_cluster
        self._cluster_folders = config.cluster_folders
        self._home = home
        self._in_folder: dict[tuple[Key, str], GitTarget] = {}
        self._targets = tuple(config.targets.values())
        self._memo: dict[tuple[str, ...], list[Route]] = {}
        for rule in config.watch_rules:
            target = config.targets[rule.target_key]
            excluded = _exclusions(rule.exclude_users, rule.exclude_field_managers)
            self._namespaced.setdefault((rule.key.cluster, rule.key.namespace), []).append(
                (rule.rules, target, excluded)
            )
        for cluster_rule in config.cluster_watch_rules:
            target = config.targets[cluster_rule.target_key]
            excluded = _exclusions(cluster_rule.exclude_users, cluster_rule.exclude_field_managers)
            self._cluster.setdefault(cluster_rule.key.cluster, []).extend(
                (r, target, excluded) for r in cluster_rule.rules
            )
        self._excludes = any(
            x is not None for rules in self._cluster.values() for _, _, x in rules
        ) or any(x is not None for rules in self._namespaced.values() for _, _, x in rules)

    def routes(
        self, ref: ObjectRef, verb: str, event: AuditEvent | None = None, *, cluster: str = ""
    ) -> list[Route]:
        """Targets for ``ref``; with ``event``, rules that exclude its user or field manager
        do not count. Rules of several clusters: only the rules of the event's cluster (or,
        without an event, of ``cluster``). The list is shared: callers do not change it."""
        if self._excludes and event is not None:
            return self._routes(ref, verb, event, cluster)
        key = (
            verb,
            ref.api_group,
            ref.api_version,
            ref.resource,
            ref.subresource,
            ref.namespace,
            # Whose rules and which folder; the home cluster, once named, stays the same.
            event.cluster if event is not None else cluster,
        )
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= MEMO_LIMIT:
                self._memo.clear()
            found = self._memo[key] = self._routes(ref, verb, event, cluster)
        return found

    def _routes(
        self, ref: ObjectRef, verb: str, event: AuditEvent | None, cluster: str
    ) -> list[Route]:
        operation = VERB_OPERATIONS.get(verb)
        if operation is None:
            return []
        whose = (event.cluster if event is not None else cluster) if self._by_cluster else ""
        cluster_scoped = is_cluster_scoped(ref)
        scope: Scope = "Cluster" if cluster_scoped else "Namespaced"
        candidates: Iterable[tuple[ResourceRule, GitTarget, Exclusions | None]] = (
            (r, t, x) for r, t, x in self._cluster.get(whose, ()) if r.scope == scope
        )
        if not cluster_scoped:
            namespaced = self._namespaced.get((whose, ref.namespace), ())
            candidates = [*candidates, *((r, t, x) for rules, t, x in namespaced for r in rules)]
        found: dict[object, Route] = {}
        for rule, target, excluded in candidates:
            if excluded is not None and event is not None and excluded.excludes(event):
                continue
            explicit = _rule_matches(rule, ref, operation)
            if explicit is None:
                continue
            previous = found.get(target.key)
            if previous is None or (explicit and not previous.explicit):
                found[target.key] = Route(target=target, explicit=explicit)
        # Without an event (who it excludes is not asked), ``cluster`` says whose it is.
        named = event.cluster if event is not None else cluster
        if named and self._in_cluster_folder(named):
            return [
                Route(target=self._for_cluster(r.target, named), explicit=r.explicit)
                for r in found.values()
            ]
        return list(found.values())

    def every_target(self, event: AuditEvent) -> list[GitTarget]:
        """Every target of the event's cluster, as its files would go to it (its cluster's
        folder)."""
        targets = self._targets
        if self._by_cluster:  # a fleet's own rules: another cluster's targets are not its
            targets = tuple(t for t in targets if t.key.cluster == event.cluster)
        if event.cluster and self._in_cluster_folder(event.cluster):
            return [self._for_cluster(t, event.cluster) for t in targets]
        return list(targets)

    def _in_cluster_folder(self, cluster: str) -> bool:
        if self._cluster_folders:
            return True
        return self._home is not None and not self._home.owns(cluster)

    def _for_cluster(self, target: GitTarget, cluster: str) -> GitTarget:
        key = (target.key, cluster)
        found = self._in_folder.get(key)
        if found is None:
            found = self._in_folder[key] = dataclasses.replace(target, cluster=cluster)
        return found


def _exclusions(users: tuple[str, ...], managers: tuple[str, ...]) -> Exclusions | None:
    return Exclusions(users=users, field_managers=managers) if users or managers else None
