"""Load the seed's custom resources (and stand-in Secrets) from YAML files and folders.

Every problem is reported with file, document number, object and field, and all problems
are collected before failing, so one run shows the user everything to fix.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import yaml

from audit_reverser.config.model import (
    ALL_OPERATIONS,
    API_VERSION,
    FLUX_GIT_REPOSITORY,
    FLUX_SOURCE_GROUP,
    GROUP,
    AgeRecipients,
    ClusterWatchRule,
    Config,
    Encryption,
    GitProvider,
    GitTarget,
    Key,
    Operation,
    PushPolicy,
    ResourceRule,
    Scope,
    SecretData,
    WatchRule,
)
from audit_reverser.errors import ConfigError

KINDS = ("GitProvider", "GitTarget", "WatchRule", "ClusterWatchRule")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_RESOURCE_PATTERN = re.compile(r"^(\*|[a-z0-9][a-z0-9.-]*)(/(\*|[a-z0-9][a-z0-9.-]*))?$")
_BAD_REF_CHARS = re.compile(r"[\x00-\x20~^:?*\[\\\x7f]")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string such as ``5s``, ``1m30s`` or ``500ms``."""
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"{text!r} is not a duration like '30s', '1m' or '1h30m'")
    return total


def is_valid_branch(name: str) -> bool:
    """A conservative subset of git-check-ref-format for one branch name."""
    return not (
        not name
        or _BAD_REF_CHARS.search(name)
        or ".." in name
        or "@{" in name
        or "//" in name
        or name.startswith(("/", "-", "."))
        or name.endswith(("/", ".", ".lock"))
        or any(part.startswith(".") for part in name.split("/"))
    )


def normalize_target_path(path: str) -> str:
    """The GitTarget path as a clean relative POSIX path ('' for the repository root)."""
    if "\\" in path or "\x00" in path or path.startswith("/"):
        raise ValueError(f"{path!r} must be a relative path with '/' separators")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{path!r} must not contain '.' or '..'")
    return "/".join(parts)


class _Document:
    """One YAML document being read; records problems with their location."""

    def __init__(self, where: str, raw: Mapping[str, Any], problems: list[str]) -> None:
        self.raw = raw
        self.problems = problems
        metadata = raw.get("metadata")
        self.metadata: Mapping[str, Any] = metadata if isinstance(metadata, Mapping) else {}
        name = self.metadata.get("name")
        self.name = name if isinstance(name, str) else ""
        namespace = self.metadata.get("namespace")
        self.namespace = namespace if isinstance(namespace, str) and namespace else "default"
        self.where = f"{where} ({raw.get('kind')} {self.name or '<no name>'})"
        if not self.name:
            self.fail("metadata.name", "is required")

    def fail(self, field: str, message: str) -> None:
        self.problems.append(f"{self.where}: {field}: {message}")

    def get(self, node: Mapping[str, Any], path: str, field: str, kind: type) -> Any:
        value = node.get(field)
        if value is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(f"{path}.{field}", f"must be {_kind_name(kind)}, got {_describe(value)}")
            return None
        return value

    def strings(self, node: Mapping[str, Any], path: str, field: str) -> tuple[str, ...]:
        value = self.get(node, path, field, list)
        if value is None:
            return ()
        if not all(isinstance(v, str) for v in value):
            self.fail(f"{path}.{field}", "must be a list of strings")
            return ()
        return tuple(value)

    def mapping(self, node: Mapping[str, Any], path: str, field: str) -> Mapping[str, Any]:
        return cast(Mapping[str, Any], self.get(node, path, field, dict) or {})

    def ref_name(self, node: Mapping[str, Any], path: str, field: str) -> str | None:
        ref = self.get(node, path, field, dict)
        if ref is None:
            return None
        name = self.get(ref, f"{path}.{field}", "name", str)
        if not name:
            self.fail(f"{path}.{field}.name", "is required")
            return None
        return cast(str, name)

    def unknown_fields(self, node: Mapping[str, Any], path: str, known: Iterable[str]) -> None:
        extra = sorted(set(node) - set(known))
        for name in extra:
            self.fail(f"{path}.{name}", "unknown field (check the spelling against the CRD)")


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
    float: "a number",
}


def _kind_name(kind: type) -> str:
    return "true or false" if kind is bool else _TYPE_NAMES[kind]


def _describe(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _read_provider(doc: _Document) -> GitProvider | None:
    spec = doc.mapping(doc.raw, "", "spec")
    doc.unknown_fields(spec, "spec", ("url", "allowedBranches", "secretRef", "push"))
    url = doc.get(spec, "spec", "url", str)
    if not url:
        doc.fail("spec.url", "is required")
    if spec.get("allowedBranches") is None:
        doc.fail("spec.allowedBranches", "is required (use ['*'] to allow every branch)")
    branches = doc.strings(spec, "spec", "allowedBranches")
    push = doc.mapping(spec, "spec", "push")
    doc.unknown_fields(push, "spec.push", ("interval", "maxCommits"))
    policy = PushPolicy()
    interval = doc.get(push, "spec.push", "interval", str)
    if interval is not None:
        try:
            seconds = parse_duration(interval)
        except ValueError as exc:
            doc.fail("spec.push.interval", str(exc))
        else:
            policy = PushPolicy(interval_s=seconds, max_commits=policy.max_commits)
    max_commits = doc.get(push, "spec.push", "maxCommits", int)
    if max_commits is not None:
        if max_commits < 1:
            doc.fail("spec.push.maxCommits", "must be at least 1")
        else:
            policy = PushPolicy(interval_s=policy.interval_s, max_commits=max_commits)
    if not url:
        return None
    return GitProvider(
        key=Key(namespace=doc.namespace, name=doc.name),
        url=url,
        allowed_branches=branches,
        secret_name=doc.ref_name(spec, "spec", "secretRef"),
        push=policy,
    )


# What a Flux GitRepository gives a GitProvider: its URL and Secret. Flux's other fields
# (ref, interval, verify, ignore, ...) are about what Flux reads and mean nothing here.
def _read_git_repository(doc: _Document) -> GitProvider | None:
    spec = doc.mapping(doc.raw, "", "spec")
    url = doc.get(spec, "spec", "url", str)
    if not url:
        doc.fail("spec.url", "is required")
    provider = doc.get(spec, "spec", "provider", str)
    if provider not in (None, "generic"):
        doc.fail(
            "spec.provider",
            f"{provider!r} (workload identity) is not supported: give the GitRepository a "
            "spec.secretRef with the credentials",
        )
    secret_name = doc.ref_name(spec, "spec", "secretRef")
    if not url:
        return None
    return GitProvider(
        key=Key(namespace=doc.namespace, name=doc.name, kind=FLUX_GIT_REPOSITORY),
        url=url,
        # Flux has no allowedBranches: the GitTarget's branch is what we write (Flux's
        # spec.ref is the branch Flux reads, not a limit on ours). Push policy: defaults.
        allowed_branches=("*",),
        secret_name=secret_name,
    )


def _is_flux_git_repository(kind: object, api_version: object) -> bool:
    """Any served version of Flux's GitRepository (v1, v1beta2): the fields read agree."""
    return (
        kind == FLUX_GIT_REPOSITORY
        and isinstance(api_version, str)
        and api_version.partition("/")[0] == FLUX_SOURCE_GROUP
    )


def _provider_kind(doc: _Document, spec: Mapping[str, Any]) -> str:
    """providerRef's kind as a provider Key's kind: '' for a GitProvider, "GitRepository"."""
    ref = doc.mapping(spec, "spec", "providerRef")
    kind = ref.get("kind") or "GitProvider"
    group = ref.get("group") or GROUP  # the CRD's default
    if kind == "GitProvider" and group == GROUP:
        return ""
    if kind == FLUX_GIT_REPOSITORY and group == FLUX_SOURCE_GROUP:
        return FLUX_GIT_REPOSITORY
    if kind == FLUX_GIT_REPOSITORY:
        doc.fail("spec.providerRef.group", f"a GitRepository is in {FLUX_SOURCE_GROUP!r}")
    elif kind == "GitProvider":
        doc.fail("spec.providerRef.group", f"a GitProvider is in {GROUP!r}")
    else:
        doc.fail(
            "spec.providerRef.kind",
            f"{kind!r}: only GitProvider ({GROUP}) or GitRepository ({FLUX_SOURCE_GROUP})",
        )
    return ""


def _read_encryption(doc: _Document, spec: Mapping[str, Any]) -> Encryption | None:
    raw = doc.get(spec, "spec", "encryption", dict)
    if raw is None:
        return None
    doc.unknown_fields(raw, "spec.encryption", ("provider", "age", "secretRef"))
    provider = doc.get(raw, "spec.encryption", "provider", str) or "sops"
    if provider != "sops":
        doc.fail("spec.encryption.provider", f"must be 'sops', got {provider!r}")
    age = doc.mapping(raw, "spec.encryption", "age")
    doc.unknown_fields(age, "spec.encryption.age", ("enabled", "recipients"))
    recipients = doc.mapping(age, "spec.encryption.age", "recipients")
    path = "spec.encryption.age.recipients"
    doc.unknown_fields(recipients, path, ("publicKeys", "extractFromSecret", "generateWhenMissing"))
    return Encryption(
        age_enabled=bool(doc.get(age, "spec.encryption.age", "enabled", bool)),
        recipients=AgeRecipients(
            public_keys=doc.strings(recipients, path, "publicKeys"),
            extract_from_secret=bool(doc.get(recipients, path, "extractFromSecret", bool)),
            generate_when_missing=bool(doc.get(recipients, path, "generateWhenMissing", bool)),
        ),
        secret_name=doc.ref_name(raw, "spec.encryption", "secretRef"),
    )


def _read_target(doc: _Document) -> GitTarget | None:
    spec = doc.mapping(doc.raw, "", "spec")
    doc.unknown_fields(spec, "spec", ("providerRef", "branch", "path", "encryption"))
    provider = doc.ref_name(spec, "spec", "providerRef")
    if spec.get("providerRef") is None:
        doc.fail("spec.providerRef", "is required")
    provider_kind = _provider_kind(doc, spec)
    branch = doc.get(spec, "spec", "branch", str)
    if not branch:
        doc.fail("spec.branch", "is required")
    elif not is_valid_branch(branch):
        doc.fail("spec.branch", f"{branch!r} is not a valid Git branch name")
    path = ""
    try:
        path = normalize_target_path(doc.get(spec, "spec", "path", str) or "")
    except ValueError as exc:
        doc.fail("spec.path", str(exc))
    encryption = _read_encryption(doc, spec)
    if not provider or not branch:
        return None
    return GitTarget(
        key=Key(namespace=doc.namespace, name=doc.name),
        provider_name=provider,
        branch=branch,
        path=path,
        encryption=encryption,
        provider_kind=provider_kind,
    )


def _read_rules(doc: _Document, spec: Mapping[str, Any], cluster: bool) -> tuple[ResourceRule, ...]:
    raw_rules = doc.get(spec, "spec", "rules", list)
    if not raw_rules:
        doc.fail("spec.rules", "needs at least one rule")
        return ()
    rules = []
    known = ("operations", "apiGroups", "apiVersions", "resources") + (
        ("scope",) if cluster else ()
    )
    for index, raw in enumerate(raw_rules):
        path = f"spec.rules[{index}]"
        if not isinstance(raw, Mapping):
            doc.fail(path, "must be an object")
            continue
        doc.unknown_fields(raw, path, known)
        operations: set[Operation] = set()
        for op in doc.strings(raw, path, "operations"):
            if op == "*":
                operations.update(ALL_OPERATIONS)
            elif op in ALL_OPERATIONS:
                operations.add(op)
            else:
                doc.fail(f"{path}.operations", f"{op!r} is not one of CREATE, UPDATE, DELETE, *")
        resources = tuple(r.lower() for r in doc.strings(raw, path, "resources"))
        if not resources:
            doc.fail(f"{path}.resources", "needs at least one resource (use '*' for all)")
        for resource in resources:
            if not _RESOURCE_PATTERN.match(resource):
                doc.fail(
                    f"{path}.resources",
                    f"{resource!r}: use '*', a plural name, 'name/*', '*/sub' or 'name/sub'"
                    " (prefix and suffix wildcards are not supported)",
                )
        scope: Scope | None = None
        if cluster:
            raw_scope = doc.get(raw, path, "scope", str)
            if raw_scope not in ("Cluster", "Namespaced"):
                doc.fail(f"{path}.scope", "is required: 'Cluster' or 'Namespaced'")
            else:
                scope = cast(Scope, raw_scope)
        rules.append(
            ResourceRule(
                operations=frozenset(operations) or ALL_OPERATIONS,
                api_groups=doc.strings(raw, path, "apiGroups"),
                api_versions=doc.strings(raw, path, "apiVersions"),
                resources=resources,
                scope=scope,
            )
        )
    return tuple(rules)


def _target_ref(doc: _Document, spec: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = doc.mapping(spec, "spec", "targetRef")
    if not ref.get("name"):
        doc.fail("spec.targetRef.name", "is required")
    if ref.get("kind", "GitTarget") != "GitTarget":
        doc.fail("spec.targetRef.kind", "only GitTarget is supported")
    if ref.get("group", GROUP) != GROUP:
        doc.fail("spec.targetRef.group", f"only {GROUP!r} is supported")
    return ref


# audit-reverser's one extension of the seed's rule schema: whose changes a rule ignores.
EXCLUDE_FIELDS = ("excludeUsers", "excludeFieldManagers")


def _read_watch_rule(doc: _Document) -> WatchRule | None:
    spec = doc.mapping(doc.raw, "", "spec")
    doc.unknown_fields(spec, "spec", ("targetRef", "rules", *EXCLUDE_FIELDS))
    ref = _target_ref(doc, spec)
    rules = _read_rules(doc, spec, cluster=False)
    name = ref.get("name")
    if not isinstance(name, str) or not name or not rules:
        return None
    return WatchRule(
        key=Key(namespace=doc.namespace, name=doc.name),
        target_name=name,
        rules=rules,
        exclude_users=doc.strings(spec, "spec", "excludeUsers"),
        exclude_field_managers=doc.strings(spec, "spec", "excludeFieldManagers"),
    )


def _read_cluster_watch_rule(doc: _Document) -> ClusterWatchRule | None:
    spec = doc.mapping(doc.raw, "", "spec")
    doc.unknown_fields(spec, "spec", ("targetRef", "rules", *EXCLUDE_FIELDS))
    ref = _target_ref(doc, spec)
    if not ref.get("namespace"):
        doc.fail("spec.targetRef.namespace", "is required (a ClusterWatchRule has no namespace)")
    rules = _read_rules(doc, spec, cluster=True)
    name, namespace = ref.get("name"), ref.get("namespace")
    if not isinstance(name, str) or not isinstance(namespace, str) or not rules:
        return None
    return ClusterWatchRule(
        key=Key(namespace="", name=doc.name),
        target_key=Key(namespace=namespace, name=name),
        rules=rules,
        exclude_users=doc.strings(spec, "spec", "excludeUsers"),
        exclude_field_managers=doc.strings(spec, "spec", "excludeFieldManagers"),
    )


def _read_secret(doc: _Document) -> SecretData:
    data: dict[str, bytes] = {}
    for field, encoded in (("data", True), ("stringData", False)):
        values = doc.mapping(doc.raw, "", field)
        for key, value in values.items():
            if not isinstance(value, str):
                doc.fail(f"{field}.{key}", "must be a string")
                continue
            try:
                data[key] = base64.b64decode(value, validate=True) if encoded else value.encode()
            except (binascii.Error, ValueError):
                doc.fail(f"{field}.{key}", "is not valid base64")
    annotations = doc.metadata.get("annotations")
    return SecretData(
        key=Key(namespace=doc.namespace, name=doc.name),
        data=data,
        annotations=dict(annotations) if isinstance(annotations, Mapping) else {},
    )


def _config_files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from sorted(
            p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
        )
    else:
        yield path


def _documents(path: Path, problems: list[str]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{path}: no such file or directory")
        return
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return
    try:
        loaded = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        problems.append(f"{path}: invalid YAML at {where}: {getattr(exc, 'problem', exc)}")
        return
    for number, raw in enumerate(loaded, start=1):
        if raw is None:
            continue
        where = f"{path}: document {number}"
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: must be a mapping with apiVersion and kind")
            continue
        yield where, raw


def load_rules(paths: Iterable[str | Path]) -> tuple[Config, list[str]]:
    """Read every YAML file given (folders are searched for ``*.yaml``/``*.yml``): the usable
    rules, and why the others are left out.

    A file that cannot be read, parsed, or holds a document that is not a valid object of
    its kind raises :class:`ConfigError`: what the user wrote is not what they meant, and
    guessing would be worse than stopping. Objects that are valid but cannot be used
    together (a GitTarget whose provider is missing or forbids its branch, a rule whose
    target is missing) are left out and returned as problems, with their file and document,
    as in a cluster: one broken target must not stop the others."""
    problems: list[str] = []
    sources = tuple(str(p) for p in paths)

    def documents() -> Iterator[tuple[str, Mapping[str, Any]]]:
        for source in sources:
            for file in _config_files(Path(source)):
                yield from _documents(file, problems)

    config, found, origins = _read_objects(documents(), sources=sources)
    problems.extend(found)
    config = dataclasses.replace(config, origins=origins)
    broken = check_references(config)
    if problems:  # all of them, so that one run shows everything to fix
        raise ConfigError([*problems, *broken])
    return usable_part(config), broken


def load_config(paths: Iterable[str | Path]) -> Config:
    """Like :func:`load_rules`, but any problem at all raises :class:`ConfigError`."""
    config, problems = load_rules(paths)
    if problems:
        raise ConfigError(problems)
    return config


def build_config(
    documents: Iterable[tuple[str, Mapping[str, Any]]], *, sources: tuple[str, ...] = ()
) -> tuple[Config, list[str]]:
    """A config from ``(where, object)`` pairs (documents of files, or objects read from a
    cluster), and the problems found. An object with a problem is left out; references to
    it then show up as problems too."""
    config, problems, _ = _read_objects(documents, sources=sources)
    problems.extend(check_references(config))
    return config, problems


def _read_objects(
    documents: Iterable[tuple[str, Mapping[str, Any]]], *, sources: tuple[str, ...]
) -> tuple[Config, list[str], dict[tuple[str, Key], str]]:
    """The objects of ``documents`` and the problems within them (not between them), and
    where each object was read."""
    problems: list[str] = []
    providers: dict[Key, GitProvider] = {}
    targets: dict[Key, GitTarget] = {}
    secrets: dict[Key, SecretData] = {}
    watch_rules: list[WatchRule] = []
    cluster_rules: list[ClusterWatchRule] = []
    seen: dict[tuple[str, Key], str] = {}
    for where, raw in documents:
        kind, api_version = raw.get("kind"), raw.get("apiVersion")
        before = len(problems)
        if kind == "Secret" and api_version == "v1":
            item: object = _read_secret(doc := _Document(where, raw, problems))
        elif _is_flux_git_repository(kind, api_version):
            item = _read_git_repository(doc := _Document(where, raw, problems))
        elif api_version != API_VERSION or kind not in KINDS:
            problems.append(
                f"{where}: unknown kind {api_version}/{kind}: expected {API_VERSION} "
                f"{', '.join(KINDS)}, v1 Secret or {FLUX_SOURCE_GROUP} {FLUX_GIT_REPOSITORY}"
            )
            continue
        else:
            doc = _Document(where, raw, problems)
            reader = {
                "GitProvider": _read_provider,
                "GitTarget": _read_target,
                "WatchRule": _read_watch_rule,
                "ClusterWatchRule": _read_cluster_watch_rule,
            }[cast(str, kind)]
            item = reader(doc)
        if item is None or len(problems) > before:
            continue
        item_key: Key = getattr(item, "key")  # noqa: B009 - every model has a key
        if (cast(str, kind), item_key) in seen:
            problems.append(
                f"{doc.where}: duplicate {kind} {item_key} "
                f"(first defined in {seen[cast(str, kind), item_key]})"
            )
            continue
        seen[cast(str, kind), item_key] = where
        match item:
            case GitProvider():
                providers[item.key] = item
            case GitTarget():
                targets[item.key] = item
            case WatchRule():
                watch_rules.append(item)
            case ClusterWatchRule():
                cluster_rules.append(item)
            case SecretData():
                secrets[item.key] = item

    config = Config(
        providers=providers,
        targets=targets,
        watch_rules=tuple(watch_rules),
        cluster_watch_rules=tuple(cluster_rules),
        secrets=secrets,
        sources=sources,
    )
    return config, problems, {(kind, key): where for (kind, key), where in seen.items()}


def check_references(config: Config) -> list[str]:
    """Problems between objects: missing targets and providers, branches not allowed."""
    problems = []
    for target in config.targets.values():
        provider = config.providers.get(target.provider_key)
        if provider is None:
            kind = target.provider_key.kind or "GitProvider"
            problem = (
                f"GitTarget {target.key}: spec.providerRef.name: {kind} "
                f"{target.provider_key} not found"
            )
        elif not any(fnmatch.fnmatchcase(target.branch, g) for g in provider.allowed_branches):
            problem = (
                f"GitTarget {target.key}: spec.branch: {target.branch!r} is not allowed by "
                f"GitProvider {provider.key} (allowedBranches: {list(provider.allowed_branches)})"
            )
        else:
            continue
        problems.append(config.located("GitTarget", target.key, problem))
    for rule in config.watch_rules:
        if rule.target_key not in config.targets:
            problem = (
                f"WatchRule {rule.key}: spec.targetRef.name: GitTarget {rule.target_key} not "
                "found (a WatchRule's target must be in its own namespace)"
            )
            problems.append(config.located("WatchRule", rule.key, problem))
    for cluster_rule in config.cluster_watch_rules:
        if cluster_rule.target_key not in config.targets:
            problem = (
                f"ClusterWatchRule {cluster_rule.key}: spec.targetRef: GitTarget "
                f"{cluster_rule.target_key} not found"
            )
            problems.append(config.located("ClusterWatchRule", cluster_rule.key, problem))
    return problems


def usable_part(config: Config) -> Config:
    """``config`` without what :func:`check_references` finds broken: targets whose provider
    is missing or does not allow their branch, rules whose target is missing. In a cluster,
    one broken object must not stop the others."""
    targets = {
        key: target
        for key, target in config.targets.items()
        if (provider := config.providers.get(target.provider_key)) is not None
        and any(fnmatch.fnmatchcase(target.branch, g) for g in provider.allowed_branches)
    }
    return dataclasses.replace(
        config,
        targets=targets,
        watch_rules=tuple(r for r in config.watch_rules if r.target_key in targets),
        cluster_watch_rules=tuple(r for r in config.cluster_watch_rules if r.target_key in targets),
    )
