"""The fast canonical YAML writer gives PyYAML's bytes, or leaves the document to PyYAML.

``canonical.pyyaml_dump`` is the definition (PyYAML's CSafeDumper); ``canonical.dump`` must
equal it byte for byte for any JSON-shaped document, and must really take the fast path for
the objects a cluster sends (else these tests would pass with the fast path switched off).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit_reverser.pipeline import blockyaml, canonical
from audit_reverser.pipeline.sanitize import sanitize
from tests.conftest import CORPUS, configmap

_props = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Strings on each side of every decision libyaml and PyYAML take: implicit types of YAML 1.1
# and our 1.2 additions, indicators, spaces and breaks at either end, escapes, non-BMP.
TRICKY = [
    "", " ", "a ", " a", "a  b", "true", "True", "yes", "No", "on", "OFF", "y", "n", "null",
    "Null", "~", "0", "0123", "0o17", "0x1F", "0b101", "1_000", "1e3", "1E-3", ".5e2", "-1",
    "+1", "1.5", ".inf", "-.Inf", ".nan", "12:30", "1:20:30.5", "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "<<", "=", "-", "--", "---", "--- a", "...", "....", "- a", "-a", "?", "? a", "?a", ":",
    ":a", ": a", "a:", "a:b", "a: b", "a :b", "#", "#a", "a#b", "a #b", ",", "a,b", "[a]",
    "{a}", "a]", "&a", "*a", "!a", "!!str", "|", ">", "'", "''", "a'b", '"', 'a"b', "%",
    "@", "`", "\\", "é", "naïve café", "日本語", "\u00a0", "a\u00a0", "\u2028", "a\u2029b",
    "\ufeff", "\ufffe", "\ue000", "😀", "a\tb", "\t", "\r", "a\r\nb", "\x85", "\x7f",
    "\x00", "\x1b[0m", "\n", "\n\n", "a\n", "a\n\n", "\na", " \n", "a \nb", "a\n b",
    "a\nb ", "a\n\nb", "#!/bin/sh\necho hi\n",
    "-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----\n",
]  # fmt: skip

_chars = st.characters(
    codec="utf-8",
    categories=("L", "N", "P", "S", "Z", "Cc", "Cf", "Co", "M"),
)
strings = st.one_of(
    st.sampled_from(TRICKY),
    st.text(_chars, max_size=12),
    st.text(st.sampled_from("ab :#-'\"\n .?!|>{}[],&*%@`~0e1\t"), max_size=10),
    st.lists(st.sampled_from(TRICKY + ["x", "  y", ""]), min_size=1, max_size=4).map("\n".join),
)
scalars = st.one_of(
    strings,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(strings, inner, max_size=4)
    ),
    max_leaves=25,
)
names = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)
objects = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["v1", "apps/v1", "example.com/v1alpha1"]),
        "kind": st.sampled_from(["ConfigMap", "Deployment", "Widget"]),
        "metadata": st.fixed_dictionaries(
            {"name": names, "namespace": names},
            optional={
                "labels": st.dictionaries(strings, strings, max_size=4),
                "annotations": st.dictionaries(strings, strings, max_size=4),
            },
        ),
    },
    optional={"data": st.dictionaries(strings, strings, max_size=5), "spec": values},
)


def _same(obj: Any, trailer: dict[str, Any] | None = None) -> None:
    try:
        expected: bytes | type[Exception] = canonical.pyyaml_dump(obj, trailer)
    except (yaml.YAMLError, UnicodeError, ValueError) as exc:  # PyYAML refuses it
        with pytest.raises(type(exc)):
            canonical.dump(obj, trailer)
        return
    assert canonical.dump(obj, trailer) == expected


@_props
@given(objects)
def test_kubernetes_like_objects_are_written_as_pyyaml_writes_them(obj: dict[str, Any]) -> None:
    _same(obj)


@_props
@given(st.dictionaries(strings, values, max_size=6))
def test_any_json_shaped_document_is_written_as_pyyaml_writes_it(obj: dict[str, Any]) -> None:
    _same(obj)


@_props
@given(objects, st.dictionaries(strings, values, min_size=1, max_size=3))
def test_a_trailer_is_written_as_pyyaml_writes_it(
    obj: dict[str, Any], trailer: dict[str, Any]
) -> None:
    _same(obj, trailer)


@pytest.mark.parametrize("value", TRICKY)
def test_each_tricky_string_as_key_value_and_item(value: str) -> None:
    _same({"k": value, value: [value, {value: value}], "l": [[value], {"x": value}]})


def test_special_values_and_empty_collections() -> None:
    for obj in [
        {},
        {"a": {}, "b": [], "c": [{}, [], None, True, False, 0, -7, 2**64]},
        {"f": [0.0, -0.0, 1.5, 1e16, 1e-7, 3.0e300, math.inf, -math.inf, math.nan]},
        {"deep": [[[["x\n"]]]], "m": [{"a": [{"b": "c"}], "d": "e\n\n"}]},
    ]:
        _same(obj)


def test_documents_outside_the_fast_path_still_match() -> None:
    deep: Any = "leaf"
    for _ in range(blockyaml.MAX_DEPTH + 5):
        deep = {"x": deep}
    long_line = "word " * (1 << 18) + "end"
    for obj in [
        deep,
        {"long": long_line},
        {"k" * 200: "long key"},
        {"t": ("a", "tuple")},
        {1: "int key"},
        {"sops": "x"},
    ]:
        _same(obj, {"sops": {"a": 1}} if obj == {"sops": "x"} else None)


def _corpus_objects() -> list[dict[str, Any]]:
    found = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            for field in ("requestObject", "responseObject"):
                body = event.get(field)
                if isinstance(body, dict) and "kind" in body:
                    found.append(body)
    return found


def test_corpus_objects_take_the_fast_path_and_match() -> None:
    objects = _corpus_objects() + [configmap(data={"a.yaml": "x: 1\ny: [2]\n"})]
    assert len(objects) > 25
    emitter = canonical._emitter
    assert emitter is not None, "PyYAML without libyaml: the fast path is off"
    for obj in objects:
        clean = sanitize(obj, api_group="", resource="")
        expected = canonical.pyyaml_dump(clean)
        assert emitter.emit(clean, canonical._ORDER).encode() == expected
        assert canonical.dump(clean) == expected


def test_sanitize_shares_nothing_it_changes_with_the_event() -> None:
    job = configmap(
        annotations={"deployment.kubernetes.io/revision": "3", "team": "a"},
        labels={"app": "x"},
    )
    job["status"] = {"active": 1}
    job["spec"] = {
        "selector": {"matchLabels": {"controller-uid": "u"}},
        "template": {"metadata": {"labels": {"controller-uid": "u", "job-name": "j"}}},
    }
    before = copy.deepcopy(job)
    clean = sanitize(job, api_group="batch", resource="jobs")
    assert job == before
    assert clean["metadata"]["annotations"] == {"team": "a"}
    assert "uid" not in clean["metadata"] and "status" not in clean
    assert clean["spec"] == {"template": {"metadata": {}}}
    assert canonical.dump(clean) == canonical.pyyaml_dump(clean)
