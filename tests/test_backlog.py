"""While Git falls behind, the backlog waits on disk: memory holds a small window of it, the
rest is read back from the journal in order, a kill -9 loses none of it and makes no commit
twice, and 429 comes only when the backlog on disk reaches ``--max-backlog``.

Git falls behind for real here: the remote is a ``git http-backend`` that stops answering
(its requests wait, as on a remote that hangs) until the test lets it go on.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from audit_reverser.config import load_config
from audit_reverser.metrics import exposition
from audit_reverser.pipeline.filter import Skip
from tests.conftest import (
    bare_repo,
    configmap,
    event,
    event_list,
    git,
    git_files,
    http_client,
    request,
    start_harness,
    start_serve,
    write_config,
)
from tests.gitservers import GitHttpServer

SECRET = {"username": "bot", "password": "s3cr3t-t0ken-9f8e7d"}

Samples = dict[str, float]


def _gauges(text: str) -> Samples:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def _batch(first: int, count: int) -> dict[str, Any]:
    items = [
        event("create", name=f"c{n}", body=configmap(f"c{n}"), audit_id=f"id-{n}")
        for n in range(first, first + count)
    ]
    return event_list(*items)


async def test_a_backlog_larger_than_the_window_is_committed_in_order_and_429_waits_for_the_disk(
    tmp_path: Path, git_http: GitHttpServer
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    git_http.answering.clear()  # the remote hangs: the writer cannot even fetch
    settings = {"journal": True, "queue_size": 8, "max_backlog": 200}
    harness = await start_harness(
        tmp_path, settings=settings, url=git_http.url(remote), secret=SECRET
    )
    try:
        async with http_client(harness, metrics=lambda: exposition(harness.runtime)) as client:
            for first in range(0, 200, 40):
                response = await client.post("/audit-webhook", json=_batch(first, 40))
                assert response.status == 200  # far more than the window: it waits on disk
            gauges = _gauges(await (await client.get("/metrics")).text())
            assert gauges["audit_reverser_journal_backlog"] == 200
            assert 0 < gauges["audit_reverser_events_in_memory"] <= 8

            # The limit counts the backlog on disk, not the few events in memory.
            response = await client.post("/audit-webhook", json=_batch(200, 1))
            assert response.status == 429

            git_http.answering.set()
            await harness.sync()
            gauges = _gauges(await (await client.get("/metrics")).text())
            assert gauges["audit_reverser_journal_backlog"] == 0
            assert gauges["audit_reverser_events_in_memory_peak"] == 8
            assert (await client.post("/audit-webhook", json=_batch(200, 1))).status == 200
        await harness.sync()
        assert await harness.subjects() == [
            f"[CREATE] v1/configmaps/default/c{n}" for n in range(201)
        ]
    finally:
        git_http.answering.set()
        await harness.runtime.close()


async def test_events_waiting_on_disk_when_the_rules_change_go_by_the_new_rules(
    tmp_path: Path, git_http: GitHttpServer
) -> None:
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    git_http.answering.clear()  # the first events hold the window until the remote answers
    settings = {"journal": True, "queue_size": 4}
    harness = await start_harness(
        tmp_path, settings=settings, url=git_http.url(remote), secret=SECRET
    )
    intake = harness.runtime.intake
    try:
        await harness.send(*_batch(0, 4)["items"])
        while intake.in_memory < 4:  # noqa: ASYNC110 - handed to the writer, in another task
            await asyncio.sleep(0.01)
        await harness.send(*_batch(4, 4)["items"])  # routed on arrival, waiting on disk
        assert intake.journal is not None and intake.journal.backlog == 8

        config = tmp_path / "config.yaml"
        text = await asyncio.to_thread(config.read_text)
        text = text.replace('resources: ["*"]', 'resources: ["secrets"]')
        await asyncio.to_thread(config.write_text, text)
        await harness.runtime.reconfigure(await asyncio.to_thread(load_config, [config]))
        git_http.answering.set()
        await harness.sync()
        assert await harness.subjects() == [
            f"[CREATE] v1/configmaps/default/c{n}" for n in range(4)
        ]
        assert harness.runtime.processor.stats.skipped[Skip.NO_RULE] == 4
    finally:
        git_http.answering.set()
        await harness.runtime.close()


BATCHES = 12
PER_BATCH = 200


def _post(port: int, n: int) -> int:
    status, _ = request(port, "POST", "/audit-webhook", orjson.dumps(_batch(n * PER_BATCH, 200)))
    return status


def _scrape(port: int) -> Samples:
    status, body = request(port, "GET", "/metrics")
    assert status == 200
    return _gauges(body.decode())


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 120  # a bound against hangs, not a time to meet
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_kill_9_with_a_backlog_on_disk_then_a_restart_commits_each_event_once(
    tmp_path: Path, git_http: GitHttpServer
) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(
        tmp_path / "c.yaml",
        remote,
        url=git_http.url(remote),
        secret=SECRET,
        max_commits=1,
        interval="100ms",
    )
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    server = start_serve(tmp_path, *args)
    try:
        # Some events go all the way to the remote first ...
        assert [_post(server.port, n) for n in range(2)] == [200, 200]
        _wait_for(lambda: len(git_files(remote)) == 2 * PER_BATCH, "the first batches pushed")
        # ... then the remote hangs, the writer waits on its push, and the rest piles up.
        git_http.answering.clear()
        assert [_post(server.port, n) for n in range(2, BATCHES)] == [200] * (BATCHES - 2)
        gauges = _scrape(server.port)
        window = 1_024
        assert gauges["audit_reverser_journal_backlog"] > window
        assert gauges["audit_reverser_events_in_memory_peak"] <= window
    finally:
        server.kill()
    git_http.answering.set()

    server = start_serve(tmp_path, *args, "--shutdown-timeout", "300")
    assert _scrape(server.port)["audit_reverser_events_in_memory_peak"] <= 1_024
    log = server.stop()
    assert server.process.returncode == 0, log

    ids = Counter(re.findall(r"^Audit-ID: (\S+)$", git(remote, "log", "--format=%B", "main"), re.M))
    assert set(ids) == {f"id-{n}" for n in range(BATCHES * PER_BATCH)}
    assert [i for i, count in ids.items() if count > 1] == []
    assert len(git_files(remote)) == BATCHES * PER_BATCH
