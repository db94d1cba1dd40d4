"""Canonical YAML: the same object always gives the same bytes.

Keys are ordered ``apiVersion, kind, metadata`` (``name, namespace`` first inside metadata),
then alphabetically at every level; block style; no aliases; multi-line strings as literal
blocks; no line folding, so a diff shows exactly the values that changed.

PyYAML defines the bytes. :mod:`~audit_reverser.pipeline.blockyaml` writes the same bytes
several times faster for the documents it is certain of; any other goes through PyYAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from audit_reverser.pipeline.blockyaml import Emitter, KeyOrder, Unsupported

_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

_TOP_ORDER = {"apiVersion": 0, "kind": 1, "metadata": 2}
_METADATA_ORDER = {"name": 0, "namespace": 1}


class _CanonicalDumper(_Dumper):  # type: ignore[misc, valid-type]
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_CanonicalDumper.add_representer(str, _str)

# PyYAML quotes a string that would read back as something else under YAML 1.1. Go tools
# (sops, yaml.v3) read YAML 1.2, where ``1e3`` is a number and ``0o17`` an integer: such
# strings are quoted too, so every reader sees the same value (SOPS MACs depend on it).
_CanonicalDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)
_CanonicalDumper.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^0o[0-7]+$"), ["0"])


# The fast emitter follows libyaml's emitter: without libyaml, PyYAML writes everything.
_emitter = (
    Emitter(_CanonicalDumper.yaml_implicit_resolvers) if _Dumper is not yaml.SafeDumper else None
)
_ORDER = KeyOrder(first=_TOP_ORDER, within={"metadata": _METADATA_ORDER})


def _ordered(value: Any, order: Mapping[str, int] | None = None) -> Any:
    if isinstance(value, Mapping):
        rank = order or {}
        keys = sorted(value, key=lambda k: (rank.get(k, len(rank)), str(k)))
        return {
            k: _ordered(
                value[k], _METADATA_ORDER if order is _TOP_ORDER and k == "metadata" else None
            )
            for k in keys
        }
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


def ordered(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` with its keys in the order :func:`dump` writes them."""
    result: dict[str, Any] = _ordered(obj, _TOP_ORDER)
    return result


def dump(obj: Mapping[str, Any], trailer: Mapping[str, Any] | None = None) -> bytes:
    """Canonical YAML of ``obj``, then the keys of ``trailer`` as given (a ``sops:`` block)."""
    if _emitter is not None:
        try:
            return _emitter.emit(obj, _ORDER, trailer).encode("utf-8")
        except Unsupported:
            pass
    return pyyaml_dump(obj, trailer)


def pyyaml_dump(obj: Mapping[str, Any], trailer: Mapping[str, Any] | None = None) -> bytes:
    """:func:`dump` by PyYAML alone: the definition the fast emitter is held to."""
    document = _ordered(obj, _TOP_ORDER)
    if trailer:
        document = {**document, **trailer}
    text = yaml.dump(
        document,
        Dumper=_CanonicalDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 20,
    )
    return text.encode("utf-8")
