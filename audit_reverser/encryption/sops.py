"""SOPS-encrypted YAML documents, written and read without the ``sops`` binary.

The format, as ``sops`` 3.x writes it with age recipients:

- every scalar under a key matching ``encrypted_regex`` becomes
  ``ENC[AES256_GCM,data:…,iv:…,tag:…,type:str]``: AES-256-GCM with the document's random
  32-byte data key, a 32-byte IV, and the key path (``data:password:``) as additional data;
  empty strings stay as they are;
- a MAC over *all* scalar values, in document order (SHA-512, upper-case hex, as sops turns
  each value into bytes), encrypted like a value with ``lastmodified`` as additional data;
- the data key, encrypted to each age recipient as an armored age file.

Documents are handled in the order their keys will be written: the MAC depends on it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from audit_reverser.encryption import age
from audit_reverser.errors import PermanentError

ENCRYPTED_REGEX = "^(data|stringData)$"
# The sops release whose output this matches (checked against sops 3.11 in the tests).
SOPS_VERSION = "3.11.0"
_VALUE = re.compile(
    r"^ENC\[AES256_GCM,data:(?P<data>[^,]*),iv:(?P<iv>[^,]+),tag:(?P<tag>[^,]+),"
    r"type:(?P<type>str|int|float|bool|bytes)\]$"
)


class _Yaml12Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.2 core schema scalars, as sops (Go, yaml.v3) reads them: ``1e3`` is a number
    and ``yes`` a string; the MAC of a document depends on it."""


_Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
):
    _Yaml12Loader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first)
    )


def _int12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text)


def _float12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith("inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    return float("nan") if text == ".nan" else float(text)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _int12)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _float12)


def load(text: bytes | str) -> dict[str, Any]:
    """A SOPS YAML file as sops reads it."""
    try:
        document = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise SopsError(f"not YAML: {exc}") from None
    if not isinstance(document, dict):
        raise SopsError("not a YAML mapping")
    return document


class SopsError(PermanentError):
    """A document that cannot be encrypted, or a SOPS file that cannot be read."""


def _sops_bytes(value: Any) -> bytes:
    """A scalar as sops turns it into bytes for the MAC (Go's ``ToBytes``)."""
    if isinstance(value, bool):  # before int: bool is an int in Python
        return b"True" if value else b"False"
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        # strconv.FormatFloat(v, 'f', -1, 64): the shortest digits, never an exponent.
        text = format(Decimal(repr(value)), "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text.encode()
    if value is None:
        return b""
    raise SopsError(f"a value of type {type(value).__name__} cannot be encrypted")


def _encrypt_value(value: str, key: bytes, additional: str) -> str:
    iv = os.urandom(32)
    sealed = AESGCM(key).encrypt(iv, value.encode(), additional.encode())
    data, tag = sealed[:-16], sealed[-16:]
    b64 = base64.b64encode
    return (
        f"ENC[AES256_GCM,data:{b64(data).decode()},iv:{b64(iv).decode()},"
        f"tag:{b64(tag).decode()},type:str]"
    )


def _decrypt_value(text: str, key: bytes, additional: str) -> Any:
    match = _VALUE.match(text)
    if match is None:
        raise SopsError("a value under an encrypted key is not ENC[AES256_GCM,...]")
    try:
        data, iv, tag = (base64.b64decode(match[name]) for name in ("data", "iv", "tag"))
        plain = AESGCM(key).decrypt(iv, data + tag, additional.encode()).decode()
    except (InvalidTag, ValueError):
        raise SopsError(f"value at {additional} does not authenticate") from None
    kind = match["type"]
    if kind == "int":
        return int(plain)
    if kind == "float":
        return float(plain)
    if kind == "bool":
        return plain.lower() == "true"
    return plain


def _walk(node: Any, path: list[str], encrypted: bool, visit: Any, regex: re.Pattern[str]) -> Any:
    """Rebuild ``node``, calling ``visit(value, path, encrypted)`` on every scalar."""
    if isinstance(node, Mapping):
        return {
            k: _walk(v, [*path, str(k)], encrypted or bool(regex.search(str(k))), visit, regex)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_walk(item, path, encrypted, visit, regex) for item in node]
    return visit(node, path, encrypted)


def _timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encrypt(
    document: Mapping[str, Any],
    recipients: Sequence[str],
    *,
    now: datetime,
    encrypted_regex: str = ENCRYPTED_REGEX,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(document with its values encrypted, the sops metadata block)``.

    The keys keep their order; write the document in that order, then ``sops:`` after it.
    """
    if not recipients:
        raise SopsError("no age recipients to encrypt to")
    if "sops" in document:
        raise SopsError("the document already has a 'sops' key")
    key = os.urandom(32)
    mac = hashlib.sha512()
    regex = re.compile(encrypted_regex)

    def visit(value: Any, path: list[str], encrypted: bool) -> Any:
        mac.update(_sops_bytes(value))
        if not encrypted or value == "":
            return value
        if not isinstance(value, str):
            # Never the value in the message: it is meant to be secret.
            raise SopsError(
                f"{'.'.join(path)}: only strings are encrypted, not {type(value).__name__}"
            )
        return _encrypt_value(value, key, ":".join(path) + ":")

    encrypted = _walk(document, [], False, visit, regex)
    modified = _timestamp(now)
    metadata = {
        "age": [{"recipient": r, "enc": age.encrypt(key, [r])} for r in recipients],
        "lastmodified": modified,
        "mac": _encrypt_value(mac.hexdigest().upper(), key, modified),
        "encrypted_regex": encrypted_regex,
        "version": SOPS_VERSION,
    }
    return encrypted, metadata


def recipients_of(document: Mapping[str, Any]) -> list[str]:
    """The age recipients a SOPS document was encrypted to ([] when it is not one)."""
    metadata = document.get("sops")
    if not isinstance(metadata, Mapping):
        return []
    entries = metadata.get("age") or []
    return [e["recipient"] for e in entries if isinstance(e, Mapping) and "recipient" in e]


def decrypt(document: Mapping[str, Any], identities: Sequence[age.Identity]) -> dict[str, Any]:
    """The plaintext of a SOPS document; its MAC is checked, so a changed value fails."""
    metadata = document.get("sops")
    if not isinstance(metadata, Mapping):
        raise SopsError("not a SOPS document (no 'sops' key)")
    key = None
    for entry in metadata.get("age") or []:
        try:
            key = age.decrypt(str(entry.get("enc", "")), list(identities))
            break
        except age.AgeError:
            continue
    if key is None or len(key) != 32:
        raise SopsError("none of the given age identities can open this document")
    regex_text = metadata.get("encrypted_regex")
    if not isinstance(regex_text, str):
        raise SopsError("only documents with encrypted_regex are supported")
    regex = re.compile(regex_text)
    mac = hashlib.sha512()

    def visit(value: Any, path: list[str], encrypted: bool) -> Any:
        if encrypted and isinstance(value, str) and value:
            value = _decrypt_value(value, key, ":".join(path) + ":")
        mac.update(_sops_bytes(value))
        return value

    body = {k: v for k, v in document.items() if k != "sops"}
    plain: dict[str, Any] = _walk(body, [], False, visit, regex)
    modified = metadata.get("lastmodified")
    if isinstance(modified, datetime):  # a YAML 1.1 reader resolves an unquoted timestamp
        modified = _timestamp(modified)
    stored = _decrypt_value(str(metadata.get("mac", "")), key, str(modified))
    if not hmac.compare_digest(str(stored), mac.hexdigest().upper()):
        raise SopsError("MAC mismatch: the document was changed after it was encrypted")
    return plain


def creation_rules(recipients: Sequence[str], encrypted_regex: str = ENCRYPTED_REGEX) -> bytes:
    """The ``.sops.yaml`` that makes ``sops`` encrypt new files in a folder as we do."""
    rules = {
        "creation_rules": [
            {
                "path_regex": r"\.sops\.yaml$",
                "encrypted_regex": encrypted_regex,
                "age": ",".join(recipients),
            }
        ]
    }
    header = (
        "# Written by audit-reverser: `sops` encrypts new *.sops.yaml files in this folder\n"
        "# for the same age recipients as the Secrets here (`sops edit FILE` keeps a file's\n"
        "# own recipients).\n"
    )
    return (header + yaml.safe_dump(rules, sort_keys=False, width=1 << 20)).encode()
