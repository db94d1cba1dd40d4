"""Settled configuration: the seed's ``configbutler.ai/v1alpha1`` kinds as frozen values.

These are what the loader produces from YAML (and, later, from the cluster). They hold no
behaviour beyond small lookups; routing lives in ``pipeline.routing``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

GROUP = "configbutler.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Operation = Literal["CREATE", "UPDATE", "DELETE"]
ALL_OPERATIONS: frozenset[Operation] = frozenset({"CREATE", "UPDATE", "DELETE"})
Scope = Literal["Cluster", "Namespaced"]

# Flux's GitRepository may stand in for a GitProvider (a GitTarget's providerRef names it).
FLUX_SOURCE_GROUP = "source.toolkit.fluxcd.io"
FLUX_GIT_REPOSITORY = "GitRepository"

DEFAULT_PUSH_INTERVAL_S = 60.0
DEFAULT_PUSH_MAX_COMMITS = 20


@dataclass(frozen=True, kw_only=True, slots=True)
class Key:
    """Namespace and name of a configuration object (namespace '' for cluster-scoped)."""

    namespace: str
    name: str
    # Only for providers: '' for a GitProvider, "GitRepository" for a Flux GitRepository, so
    # that the two kinds never collide when they share a name (they live in one map).
    kind: str = ""
    # In a fleet whose rules are each cluster's own custom resources (cluster.fleet): the
    # cluster the object was read from, so that two clusters' default/main never collide.
    cluster: str = ""

    def __str__(self) -> str:
        name = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.cluster}:{name}" if self.cluster else name


@dataclass(frozen=True, kw_only=True, slots=True)
class PushPolicy:
    interval_s: float = DEFAULT_PUSH_INTERVAL_S
    max_commits: int = DEFAULT_PUSH_MAX_COMMITS


@dataclass(frozen=True, kw_only=True, slots=True)
class GitProvider:
    key: Key
    url: str
    allowed_branches: tuple[str, ...]
    secret_name: str | None = None
    push: PushPolicy = field(default_factory=PushPolicy)

    @property
    def kind(self) -> str:
        """The kind the provider was read from, for messages: GitProvider or GitRepository."""
        return self.key.kind or "GitProvider"


@dataclass(frozen=True, kw_only=True, slots=True)
class AgeRecipients:
    public_keys: tuple[str, ...] = ()
    extract_from_secret: bool = False
    generate_when_missing: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Encryption:
    provider: Literal["sops"] = "sops"
    age_enabled: bool = False
    recipients: AgeRecipients = field(default_factory=AgeRecipients)
    secret_name: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class GitTarget:
    key: Key
    provider_name: str
    branch: str
    path: str
    encryption: Encryption | None = None
    provider_kind: str = ""  # providerRef.kind: '' (GitProvider) or "GitRepository" (Flux)
    # Set by routing, never read from YAML: the cluster whose folder under ``path`` this
    # event's files go to, when one set of rules serves several clusters (docs/fleet.md).
    cluster: str = ""

    @property
    def provider_key(self) -> Key:
        # providerRef has no namespace field: the provider lives beside the target.
        return Key(
            namespace=self.key.namespace,
            name=self.provider_name,
            kind=self.provider_kind,
            cluster=self.key.cluster,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ResourceRule:
    """One entry of a rule's ``rules``; empty tuples and ``*`` mean 'all'."""

    operations: frozenset[Operation] = ALL_OPERATIONS
    api_groups: tuple[str, ...] = ()
    api_versions: tuple[str, ...] = ()
    resources: tuple[str, ...] = ("*",)
    scope: Scope | None = None  # None for WatchRule entries (always namespaced)


@dataclass(frozen=True, kw_only=True, slots=True)
class WatchRule:
    """Selects namespaced objects in its own namespace, for a GitTarget in that namespace."""

    key: Key
    target_name: str
    rules: tuple[ResourceRule, ...]
    # Not commits for this rule (globs); an extension of the seed's schema, see deploy/base/crds.
    exclude_users: tuple[str, ...] = ()
    exclude_field_managers: tuple[str, ...] = ()

    @property
    def target_key(self) -> Key:
        return Key(namespace=self.key.namespace, name=self.target_name, cluster=self.key.cluster)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterWatchRule:
    key: Key
    target_key: Key
    rules: tuple[ResourceRule, ...]
    exclude_users: tuple[str, ...] = ()
    exclude_field_managers: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class SecretData:
    """A ``v1`` Secret from the config files, standing in for a cluster Secret."""

    key: Key
    data: Mapping[str, bytes]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    providers: Mapping[Key, GitProvider]
    targets: Mapping[Key, GitTarget]
    watch_rules: tuple[WatchRule, ...]
    cluster_watch_rules: tuple[ClusterWatchRule, ...]
    secrets: Mapping[Key, SecretData]
    sources: tuple[str, ...] = ()
    # The rules serve whichever clusters post (files, the embedded default) rather than
    # being one cluster's own custom resources: an event with a cluster name then goes to
    # that cluster's folder under each target's path, so clusters never share a file.
    cluster_folders: bool = False
    # The rules are several clusters' own custom resources (a fleet without --config; every
    # Key carries its cluster): an event is routed by its own cluster's rules only.
    by_cluster: bool = False
    # Where each object was read, by (kind, key): "FILE: document N", for messages.
    origins: Mapping[tuple[str, Key], str] = field(default_factory=dict)
    # A fleet's clusters whose rules are not read yet (their API did not answer), and why:
    # their events are neither routed nor skipped, but refused until the rules are in.
    waiting: Mapping[str, str] = field(default_factory=dict)

    def located(self, kind: str, key: Key, problem: str) -> str:
        """``problem`` with the file and document the object came from, when known."""
        origin = self.origins.get((kind, key))
        return f"{problem} (in {origin})" if origin else problem
