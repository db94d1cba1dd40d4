"""kill -9 in the middle of a stream: every event that got a 200 is in the remote exactly once.

A real ``serve`` process, a sender posting batches back to back as the apiserver does, and
SIGKILL at whatever point the stream has reached (journal write, commit, push). The sender
then does what the apiserver does: it sends the failed batch and the rest again, and also one
batch it had a 200 for (a response lost on the wire).
"""

from __future__ import annotations

import http.client
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import (
    bare_repo,
    configmap,
    event,
    event_list,
    git,
    git_files,
    start_serve,
    write_config,
)

BATCHES = 240
KEPT_PER_BATCH = 4


def _batch(n: int) -> dict[str, Any]:
    items = []
    for j in range(KEPT_PER_BATCH):
        name = f"b{n}-{j}"
        items.append(event("create", name=name, body=configmap(name), audit_id=f"id-{n}-{j}"))
        items.append(event("get", name=name, body=configmap(name)))  # filtered out
    return event_list(*items)


def _post_all(
    port: int, numbers: list[int], acked: list[int], reached: threading.Event | None = None
) -> None:
    """Post batches in order on one connection; stop at the first failure. ``reached`` is set
    once 60 batches got their 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for n in numbers:
            connection.request(
                "POST",
                "/audit-webhook",
                body=orjson.dumps(_batch(n)),
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                return
            acked.append(n)
            if reached is not None and len(acked) >= 60:
                reached.set()
    except (OSError, http.client.HTTPException):
        return  # the process died under us
    finally:
        connection.close()


def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote, max_commits=7, interval="100ms")
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]

    server = start_serve(tmp_path, *args)
    acked: list[int] = []
    reached = threading.Event()
    numbers = list(range(BATCHES))
    sender = threading.Thread(target=_post_all, args=(server.port, numbers, acked, reached))
    sender.start()
    assert reached.wait(timeout=120), "the sender never got 60 answers"
    server.kill()
    sender.join(timeout=60)
    first_run = list(acked)
    assert first_run == list(range(len(first_run))) and 60 <= len(first_run) < BATCHES

    # Everything acknowledged must be committed before the process exits: a shut-down time
    # long enough for a slow (coverage-traced) machine, so that none stays in the journal.
    server = start_serve(tmp_path, *args, "--shutdown-timeout", "300")
    resend = [first_run[-1], *range(len(first_run), BATCHES)]
    acked_again: list[int] = []
    _post_all(server.port, resend, acked_again)
    log = server.stop()
    assert server.process.returncode == 0, log
    assert acked_again == resend

    ids = Counter(re.findall(r"^Audit-ID: (\S+)$", git(remote, "log", "--format=%B", "main"), re.M))
    expected = {f"id-{n}-{j}" for n in range(BATCHES) for j in range(KEPT_PER_BATCH)}
    assert set(ids) == expected
    assert [i for i, count in ids.items() if count > 1] == []
    assert len(git_files(remote)) == BATCHES * KEPT_PER_BATCH
