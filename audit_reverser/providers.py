"""A Git provider's remote as its Secret describes it: the transport with its credentials, the
committer and the signing key, and the check of every provider's remote (``check``).

GitProviders and Flux GitRepositories alike; each problem is a ConfigError that names the
provider, the Secret and the key, so that a broken provider can be left out and reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from audit_reverser.config.model import Config, GitProvider, Key
from audit_reverser.encryption.sshsig import SigningKey
from audit_reverser.errors import ConfigError, RepositoryError
from audit_reverser.gitstore.health import RemoteHealth, probe
from audit_reverser.gitstore.transport import (
    LocalTransport,
    NetworkTransport,
    install_trust,
    remote_key,
    transport_for,
)
from audit_reverser.gitstore.types import Identity


def _provider_secret(
    config: Config, provider: GitProvider
) -> tuple[Mapping[str, bytes] | None, str]:
    """The data of a provider's ``secretRef`` Secret (None without one) and its name."""
    if provider.secret_name is None:
        return None, f"no Secret ({provider.kind} spec.secretRef is not set)"
    key = Key(
        namespace=provider.key.namespace, name=provider.secret_name, cluster=provider.key.cluster
    )
    found = config.secrets.get(key)
    if found is None:
        raise ConfigError(
            [f"{provider.kind} {provider.key}: spec.secretRef.name: Secret {key} not found"]
        )
    return found.data, f"Secret {key}"


def provider_transport(config: Config, provider: GitProvider) -> LocalTransport | NetworkTransport:
    """The transport of a provider, with the credentials of its ``secretRef`` Secret."""
    secret, source = _provider_secret(config, provider)
    try:
        return transport_for(provider.url, secret, source)
    except RepositoryError as exc:
        raise ConfigError([f"{provider.kind} {provider.key}: {exc}"]) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class CommitSigning:
    """Who commits for a provider and with which key it signs, from its Secret: keys
    ``committerName``/``committerEmail`` (else the default committer) and ``signingKey``
    (+ ``signingKeyPassphrase``), an OpenSSH private key; unsigned without it."""

    committer: Identity | None = None
    key: SigningKey | None = None


def _secret_text(secret: Mapping[str, bytes], name: str, source: str) -> str | None:
    value = secret.get(name)
    try:
        return value.decode().strip() if value is not None else None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: {name} is not UTF-8 text"]) from None


def provider_signing(config: Config, provider: GitProvider) -> CommitSigning:
    """The committer and signing key of a provider; a ConfigError names the Secret and key
    that cannot be used (then nothing is committed for it, rather than unsigned)."""
    secret, source = _provider_secret(config, provider)
    if not secret:
        return CommitSigning()
    where = f"{provider.kind} {provider.key}: {source}"
    name = _secret_text(secret, "committerName", where)
    email = _secret_text(secret, "committerEmail", where)
    committer = None
    if name is not None or email is not None:
        if not name or not email:
            raise ConfigError([f"{where}: committerName and committerEmail go together"])
        if any(c in f"{name}{email}" for c in "<>\n\0") or " " in email or "@" not in email:
            raise ConfigError(
                [
                    f"{where}: committerEmail {email!r} with committerName {name!r} is not a Git "
                    "identity (an email address, and no <, > or line breaks)"
                ]
            )
        committer = Identity(name=name, email=email)
    text = secret.get("signingKey")
    if text is None:
        return CommitSigning(committer=committer)
    passphrase = secret.get("signingKeyPassphrase")
    key = SigningKey.load(text, passphrase, source=f"{where}: signingKey")
    return CommitSigning(committer=committer, key=key)


@dataclass(frozen=True, kw_only=True, slots=True)
class Remote:
    transport: LocalTransport | NetworkTransport
    key: str  # remote_key(url): local paths resolved, so it is made off the event loop
    signing: CommitSigning


def provider_remotes(config: Config) -> dict[Key, Remote | ConfigError]:
    """Each provider's remote, or why it has none."""
    found: dict[Key, Remote | ConfigError] = {}
    for key, provider in config.providers.items():
        try:
            found[key] = Remote(
                transport=provider_transport(config, provider),
                key=remote_key(provider.url),
                signing=provider_signing(config, provider),
            )
        except ConfigError as exc:
            found[key] = exc
    return found


def usable_providers(config: Config) -> tuple[Config, list[str]]:
    """``config`` without the targets whose provider's credentials cannot be used, and
    why (a signing key is not checked here: ``check`` reports it per provider)."""
    broken = {}
    for key in sorted({t.provider_key for t in config.targets.values()}, key=str):
        try:
            provider_transport(config, config.providers[key])
        except ConfigError as exc:
            broken[key] = config.located(config.providers[key].kind, key, str(exc))
    targets = {k: t for k, t in config.targets.items() if t.provider_key not in broken}
    usable = dataclasses.replace(
        config,
        targets=targets,
        watch_rules=tuple(r for r in config.watch_rules if r.target_key in targets),
        cluster_watch_rules=tuple(r for r in config.cluster_watch_rules if r.target_key in targets),
    )
    return usable, list(broken.values())


@dataclass(frozen=True, kw_only=True, slots=True)
class ProviderCheck:
    provider: GitProvider
    targets: tuple[Key, ...]
    health: RemoteHealth
    signing: CommitSigning = field(default_factory=CommitSigning)
    signing_problem: str | None = None  # why the committer or signing key cannot be used

    @property
    def ready(self) -> bool:
        return self.health.ready and self.signing_problem is None

    @property
    def reason(self) -> str:
        return "SigningKeyInvalid" if self.signing_problem is not None else self.health.reason

    @property
    def message(self) -> str:
        return self.signing_problem or self.health.message


async def check_remotes(config: Config, trust_home: Path) -> list[ProviderCheck]:
    """Probe every (provider, branch) the targets use, concurrently; nothing is written."""
    wanted: dict[tuple[Key, str], list[Key]] = {}
    for target in config.targets.values():
        wanted.setdefault((target.provider_key, target.branch), []).append(target.key)
    transports = {key: provider_transport(config, config.providers[key]) for key, _ in wanted}

    def load_signing(key: Key) -> CommitSigning | ConfigError:
        try:  # an encrypted key's passphrase is stretched (bcrypt): off the event loop
            return provider_signing(config, config.providers[key])
        except ConfigError as exc:
            return exc

    signings = {key: await asyncio.to_thread(load_signing, key) for key in transports}
    await asyncio.to_thread(install_trust, trust_home, transports.values())
    healths = await asyncio.gather(
        *(asyncio.to_thread(probe, transports[key], branch) for key, branch in wanted)
    )
    checks = []
    for ((key, _), targets), health in zip(wanted.items(), healths, strict=True):
        signing = signings[key]
        checks.append(
            ProviderCheck(
                provider=config.providers[key],
                targets=tuple(targets),
                health=health,
                signing=signing if isinstance(signing, CommitSigning) else CommitSigning(),
                signing_problem=str(signing) if isinstance(signing, ConfigError) else None,
            )
        )
    return checks
