"""The webhook receiver over real HTTP: status codes, and commits in the remote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CORPUS, Harness, configmap, event, event_list, http_client


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[TestClient]:
    async with http_client(harness, max_body_bytes=64 * 1024) as c:
        yield c


async def test_posted_event_list_becomes_a_commit(client: TestClient, harness: Harness) -> None:
    response = await client.post(
        "/audit-webhook",
        json=event_list(event("create", body=configmap()), event("get", body=configmap())),
    )
    assert response.status == 200
    assert await response.json() == {"received": 2, "kept": 1, "skipped": {"read-verb": 1}}
    await harness.sync()
    assert await harness.subjects() == ["[CREATE] v1/configmaps/default/demo"]


async def test_cluster_in_the_path_becomes_a_trailer(client: TestClient, harness: Harness) -> None:
    response = await client.post(
        "/audit-webhook/prod-eu1", json=event_list(event("create", body=configmap()))
    )
    assert response.status == 200
    await harness.sync()
    [body] = await harness.log("%b")
    assert "Cluster: prod-eu1" in body


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        (b"[]", {"Content-Type": "application/json"}, 400, "must be a JSON object"),
        (
            orjson.dumps({"kind": "PodList", "apiVersion": "v1", "items": []}),
            {"Content-Type": "application/json"},
            400,
            "must be an EventList",
        ),
        (
            orjson.dumps({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": {}}),
            {"Content-Type": "application/json"},
            400,
            "items must be a list",
        ),
        (b"{}", {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json"),
    ],
)
async def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(
    client: TestClient, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    response = await client.post("/audit-webhook", data=body, headers=headers)
    assert response.status == status
    assert message in (await response.json())["message"]
    assert (await client.get("/healthz")).status == 200


async def test_oversized_body_gets_413(client: TestClient) -> None:
    huge = event_list(event("create", body=configmap(data={"blob": "x" * 100_000})))
    response = await client.post("/audit-webhook", json=huge)
    assert response.status == 413


async def test_invalid_cluster_name_gets_400(client: TestClient) -> None:
    response = await client.post("/audit-webhook/bad%20name", json=event_list())
    assert response.status == 400


async def test_bad_items_are_counted_good_ones_kept(client: TestClient, harness: Harness) -> None:
    response = await client.post(
        "/audit-webhook",
        json=event_list(
            event("create", body=configmap()),
            "not an event",
            {**event("create", body=configmap("x")), "user": "nobody"},
        ),
    )
    assert response.status == 200
    assert (await response.json())["skipped"] == {"malformed": 2}
    await harness.sync()
    assert await harness.subjects() == ["[CREATE] v1/configmaps/default/demo"]


async def test_the_whole_corpus_posted_as_event_lists(client: TestClient, harness: Harness) -> None:
    def corpus() -> list[list[dict[str, object]]]:
        batches = []
        for file in sorted(CORPUS.glob("*.jsonl")):
            items = [orjson.loads(line) for line in file.read_bytes().splitlines()]
            for item in items:
                del item["kind"], item["apiVersion"]  # as the webhook sends them
            batches.append(items)
        return batches

    received = 0
    for items in await asyncio.to_thread(corpus):
        response = await client.post("/audit-webhook", json=event_list(*items))
        assert response.status == 200, await response.text()
        received += (await response.json())["received"]
    await harness.sync()
    assert received == 85
    assert "live/v1/configmaps/default/my-config.yaml" in await harness.files()


async def test_health_and_readiness(client: TestClient, harness: Harness) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    harness.runtime.accepting = False
    assert (await client.get("/readyz")).status == 503
    response = await client.post("/audit-webhook", json=event_list())
    assert response.status == 503 and response.headers["Retry-After"]
