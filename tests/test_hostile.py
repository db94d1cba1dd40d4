"""Hostile input: every bad request gets a clear 4xx, bad events in a good batch are counted,
nothing crashes or hangs, and no file lands outside the target path.

The property tests post what hypothesis makes of the audit Event schema to a real ``serve``
process, and check after each example that it still answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    Harness,
    bare_repo,
    configmap,
    event,
    event_list,
    git_files,
    http_client,
    request,
    start_harness,
    start_serve,
    write_config,
)

WEBHOOK_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[TestClient]:
    async with http_client(harness, max_body_bytes=1024 * 1024) as c:
        yield c


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"kind": "EventList", "items": [' + b"[" * 2000 + b"]" * 2000 + b"]}", "valid JSON"),
        (b'{"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": ["\xff"]}', "JSON"),
        (b"\x00\x01\x02", "valid JSON"),
        (b"", "valid JSON"),
        (orjson.dumps({"kind": "x" * 100_000, "apiVersion": "v1"}), "must be an EventList"),
    ],
)
async def test_undecodable_bodies_get_400(client: TestClient, body: bytes, message: str) -> None:
    response = await client.post("/audit-webhook", data=body, headers=WEBHOOK_HEADERS)
    assert response.status == 400
    answer = await response.json()
    assert message in answer["message"] and len(answer["message"]) < 300
    assert (await client.get("/healthz")).status == 200


async def test_forged_and_broken_events_are_counted_and_the_good_one_is_kept(
    client: TestClient, harness: Harness
) -> None:
    forged = [
        event("create", name=name, body=configmap(name))
        for name in ("../../etc/passwd", "a/b", "x\x00y", "..", ".hidden")
    ]
    forged.append(event("create", namespace="../kube-system", body=configmap()))
    deep = event("create", body={**configmap("deep"), "data": _nested(900)}, name="deep")
    broken = [
        {**event("create", body=configmap()), "auditID": ""},
        {**event("create", body=configmap()), "auditID": ["x"]},
        {**event("create", body=configmap()), "verb": ["create"]},
        {**event("create", body=configmap()), "objectRef": "configmaps"},
        {**event("create", body=configmap()), "user": {"username": 7}},
        {**event("create", body=configmap()), "responseStatus": {"code": True}},
        # An empty list where a string belongs (found by hypothesis: a set lookup, a 500).
        {
            **event("create", body=configmap()),
            "objectRef": {"resource": "configmaps", "subresource": []},
        },
    ]
    good = event("create", body=configmap("good"))
    response = await client.post("/audit-webhook", json=event_list(*forged, deep, *broken, good))
    assert response.status == 200
    answer = await response.json()
    assert answer["skipped"] == {
        "invalid-name": 6,
        "malformed": 5,
        "failed-request": 1,  # code true
        "no-object-ref": 1,  # objectRef a string
    }
    await harness.sync()
    assert await harness.files() == ["live/v1/configmaps/default/good.yaml"]
    assert harness.runtime.stats.skipped["malformed"] == 6  # the deep one, once it was built


@pytest.mark.parametrize("depth", [300, 1000])
async def test_an_object_nested_past_what_orjson_writes_does_not_lose_its_batch(
    tmp_path: Path, depth: int
) -> None:
    """orjson reads 1,024 levels of nesting but writes 255: an event nested deeper, on its
    way into the journal, failed the whole batch with a 500 (every other user's events in it
    with it). Now the batch is taken: 300 levels are written as any object, 1,000 are
    refused on their own (too deep to write back out)."""
    harness = await start_harness(tmp_path, settings={"journal": True})
    try:
        deep = event("create", name="deep", body={**configmap("deep"), "data": "@DEEP@"})
        body = orjson.dumps(event_list(deep, event("create", body=configmap("good"))))
        body = body.replace(b'"@DEEP@"', b'{"k":' * depth + b"{}" + b"}" * depth)
        async with http_client(harness) as client:
            response = await client.post("/audit-webhook", data=body, headers=WEBHOOK_HEADERS)
            assert response.status == 200, await response.text()
        await harness.sync()
        files = ["live/v1/configmaps/default/good.yaml"]
        if depth == 300:
            assert await harness.files() == ["live/v1/configmaps/default/deep.yaml", *files]
        else:
            assert await harness.files() == files
            assert harness.runtime.stats.skipped == {"malformed": 1}
    finally:
        await harness.runtime.close()


# -- property tests against a real process ------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what JSON encoders emit
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_names = st.sampled_from(["demo", "../x", "a/b", "x\x00y", "..", "", "A" * 300, "ok"]) | st.text()


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-formed value, sometimes any JSON at all."""
    return st.one_of(strategy, strategy, strategy, _json)


_object_ref = st.fixed_dictionaries(
    {"resource": _maybe(st.sampled_from(["configmaps", "secrets", "namespaces", "deployments"]))},
    optional={
        "apiGroup": _maybe(st.sampled_from(["", "apps", "example.com"])),
        "apiVersion": _maybe(st.sampled_from(["v1", "v2", ""])),
        "namespace": _maybe(_names),
        "name": _maybe(_names),
        "subresource": _maybe(st.sampled_from(["status", "scale", "token", ""])),
    },
)
_response_object = st.fixed_dictionaries(
    {
        "apiVersion": _maybe(st.just("v1")),
        "kind": _maybe(st.just("ConfigMap")),
        "metadata": _maybe(
            st.fixed_dictionaries(
                {"name": _maybe(_names)},
                optional={"namespace": _maybe(_names), "resourceVersion": _maybe(st.text())},
            )
        ),
    },
    optional={"data": _json},
)
_events = st.fixed_dictionaries(
    {
        "auditID": _maybe(st.uuids().map(str)),
        "stage": _maybe(st.sampled_from(["ResponseComplete", "RequestReceived"])),
        "verb": _maybe(st.sampled_from(["create", "update", "patch", "delete", "get"])),
        "objectRef": _maybe(_object_ref),
        "responseStatus": _maybe(
            st.fixed_dictionaries({"code": _maybe(st.sampled_from([200, 201, 404]))})
        ),
    },
    optional={
        "level": _maybe(st.sampled_from(["Metadata", "RequestResponse"])),
        "requestURI": _maybe(st.text()),
        "user": _maybe(st.fixed_dictionaries({"username": _maybe(st.text())})),
        "impersonatedUser": _maybe(st.fixed_dictionaries({"username": _maybe(st.text())})),
        "sourceIPs": _maybe(st.lists(st.text(), max_size=2)),
        "userAgent": _maybe(st.text()),
        "responseObject": _maybe(_response_object),
        "requestObject": _json,
        "stageTimestamp": _maybe(st.datetimes().map(lambda t: t.isoformat() + "Z")),
        "kind": _maybe(st.just("Event")),
        "apiVersion": _maybe(st.just("audit.k8s.io/v1")),
    },
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    remote = bare_repo(root / "remote.git")
    config = write_config(root / "c.yaml", remote, target_path="live")
    server = start_serve(root, "--config", str(config), "--state-dir", str(root / "state"))
    yield server.port, remote
    log = server.stop()
    assert server.process.returncode == 0, log
    assert "Traceback" not in log
    assert all(path.startswith("live/") for path in git_files(remote))


def _request(port: int, method: str, path: str, body: bytes | None = None) -> int:
    return request(port, method, path, body)[0]


_fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(items=st.lists(_events, max_size=6))
def test_fuzzed_event_lists_never_get_a_5xx(
    served: tuple[int, Path], items: list[dict[str, Any]]
) -> None:
    port, _ = served
    status = _request(port, "POST", "/audit-webhook", orjson.dumps(event_list(*items)))
    assert status in (200, 400), status
    assert _request(port, "GET", "/healthz") == 200


@_fuzz
@given(document=_json, raw=st.binary(max_size=200))
def test_fuzzed_bodies_never_get_a_5xx(
    served: tuple[int, Path], document: object, raw: bytes
) -> None:
    port, _ = served
    for body in (orjson.dumps(document), raw):
        assert _request(port, "POST", "/audit-webhook/prod", body) == 400
    assert _request(port, "GET", "/healthz") == 200
