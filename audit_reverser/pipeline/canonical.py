"""Canonical YAML: the same object always gives the same bytes.

Keys are ordered ``apiVersion, kind, metadata`` (``name, namespace`` first inside metadata),
then alphabetically at every level; block style; no aliases; multi-line strings as literal
blocks; no line folding, so a diff shows exactly the values that changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

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


def dump(obj: Mapping[str, Any]) -> bytes:
    text = yaml.dump(
        _ordered(obj, _TOP_ORDER),
        Dumper=_CanonicalDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 20,
    )
    return text.encode("utf-8")
