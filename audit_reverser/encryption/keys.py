"""Which age recipients a GitTarget's Secrets are encrypted to, from ``spec.encryption``.

As the seed defines it: static ``age.recipients.publicKeys``; ``extractFromSecret`` (every
``*.agekey`` entry of ``encryption.secretRef``, the recipient derived from the private key);
``generateWhenMissing`` (a date-named ``*.agekey`` made when that Secret has none). In file
mode the Secret comes from the config files, and a generated key is kept under
``--state-dir/encryption/keys/<namespace>/<secret>/`` (mode 0600), reused on every start:
one key, however often the process restarts. Its owner must back it up; without it, the
Secrets in Git cannot be decrypted by anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from audit_reverser.config.model import GitTarget, Key, SecretData
from audit_reverser.encryption import age
from audit_reverser.errors import ConfigError

log = logging.getLogger(__name__)

KEY_SUFFIX = ".agekey"


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetKeys:
    """The recipients of one target, or why its Secrets cannot be written."""

    recipients: tuple[str, ...] = ()
    problem: str | None = None
    generated: Path | None = None  # a key generateWhenMissing made (or made earlier)


def _secret_identities(secret: SecretData, where: str) -> list[tuple[str, age.Identity]]:
    found = []
    for name in sorted(secret.data):
        if not name.endswith(KEY_SUFFIX):
            continue
        try:
            found.append((name, age.Identity.parse(secret.data[name].decode())))
        except (age.AgeError, UnicodeDecodeError):
            raise ConfigError(
                [f"{where}: {name} is not an age private key (AGE-SECRET-KEY-1...)"]
            ) from None
    return found


def _generated_key(folder: Path) -> tuple[Path, age.Identity, bool]:
    """The key in ``folder`` (made now when there is none): ``(file, identity, made now)``."""
    existing = sorted(folder.glob(f"*{KEY_SUFFIX}")) if folder.is_dir() else []
    if existing:
        return existing[0], age.Identity.parse(existing[0].read_text()), False
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.now(UTC)
    identity = age.Identity.generate()
    path = folder / f"{now:%Y-%m-%d}{KEY_SUFFIX}"
    # Created with 0600 from the first byte: the key never exists readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(identity.key_file(now.strftime("%Y-%m-%dT%H:%M:%SZ")))
        out.flush()
        os.fsync(out.fileno())
    return path, identity, True


def resolve(
    target: GitTarget,
    secrets: Mapping[Key, SecretData],
    state_dir: Path,
    *,
    generate_locally: bool = True,
) -> TargetKeys:
    """The age recipients for ``target``'s Secrets; a broken key is a ConfigError.

    ``generate_locally`` False (rules from a cluster): generateWhenMissing writes its key
    into the cluster Secret (cluster.rules), never to the state directory."""
    where = f"GitTarget {target.key}: spec.encryption"
    encryption = target.encryption
    if encryption is None:
        return TargetKeys(problem=f"GitTarget {target.key} has no spec.encryption")
    if not encryption.age_enabled:
        return TargetKeys(problem=f"{where}.age.enabled is not true")
    options = encryption.recipients
    recipients: list[str] = []
    for text in options.public_keys:
        try:
            recipients.append(age.recipient_text(age.parse_recipient(text)))
        except age.AgeError as exc:
            raise ConfigError([f"{where}.age.recipients.publicKeys: {exc}"]) from None
    secret = None
    secret_key = None
    if encryption.secret_name is not None:
        secret_key = Key(
            namespace=target.key.namespace, name=encryption.secret_name, cluster=target.key.cluster
        )
        secret = secrets.get(secret_key)
    in_secret = (
        _secret_identities(secret, f"{where}.secretRef: Secret {secret_key}") if secret else []
    )
    if options.extract_from_secret:
        if secret_key is None:
            raise ConfigError([f"{where}.secretRef: extractFromSecret needs a Secret"])
        recipients += [identity.recipient for _, identity in in_secret]
    generated = None
    if options.generate_when_missing and not in_secret and generate_locally:
        if secret_key is None:
            raise ConfigError([f"{where}.secretRef: generateWhenMissing needs a Secret"])
        folder = state_dir / "encryption" / "keys" / secret_key.namespace / secret_key.name
        generated, identity, made = _generated_key(folder)
        recipients.append(identity.recipient)
        log.warning(
            "%s: %s age key %s (recipient %s) stands in for a *.agekey entry of Secret %s. "
            "BACK IT UP NOW: without it, nobody can decrypt the Secrets in Git. Then add it "
            "to that Secret as %s, or keep this file.",
            target.key,
            "generated the" if made else "using the generated",
            generated,
            identity.recipient,
            secret_key,
            generated.name,
        )
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        source = f"Secret {secret_key}" if secret_key else "spec.encryption"
        return TargetKeys(
            problem=f"{where}: no age recipients (no publicKeys, no *.agekey in {source}, "
            "generateWhenMissing is false)"
        )
    return TargetKeys(recipients=tuple(recipients), generated=generated)


def fingerprint_key(state_dir: Path) -> bytes:
    """The local key that makes fingerprints of Secret content (see :func:`fingerprint`)."""
    path = state_dir / "encryption" / "fingerprint.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = os.urandom(32)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key.hex())
        temporary.replace(path)
        return key


def fingerprint(key: bytes, recipients: tuple[str, ...], plaintext: bytes) -> str:
    """Equal for equal plaintext and recipients, so an unchanged Secret makes no commit
    although encrypting it again would give new ciphertext. Keyed: it never leaves the
    state directory, and without the key it says nothing about the plaintext."""
    message = "\n".join(sorted(recipients)).encode() + b"\0" + plaintext
    return hmac.new(key, message, hashlib.sha256).hexdigest()
