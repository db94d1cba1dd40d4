"""``serve --journal redis://…`` as a user runs it: a real ``serve`` process, a real
``redis-server`` (AOF fsynced on every write, a password), a real bare remote that refuses
non-fast-forward pushes. What is checked is what the sender and the remote see: 200 only for
durable batches, 503 with Retry-After and /readyz false while Redis is away, 429 when the
stream's backlog is full, and every acknowledged event in the remote exactly once, also after
SIGKILL and a start on an empty state directory (the mirror is a cache; Redis is the record
until the push).
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import (
    bare_repo,
    configmap,
    event,
    event_list,
    free_port,
    git,
    git_files,
    request,
    start_serve,
    write_config,
)
from tests.gitservers import GitHttpServer
from tests.redisserver import RedisServer
from tests.test_metrics import SHARED_JOURNAL_ONLY

KEPT_PER_BATCH = 4
BATCHES = 200
STREAM = "audit-reverser:stream:intake"


def _batch(n: int) -> dict[str, Any]:
    items = []
    for j in range(KEPT_PER_BATCH):
        name = f"b{n}-{j}"
        items.append(event("create", name=name, body=configmap(name), audit_id=f"id-{n}-{j}"))
        items.append(event("get", name=name, body=configmap(name)))  # filtered out
    return event_list(*items)


def _post(port: int, n: int) -> tuple[int, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            "POST",
            "/audit-webhook",
            body=orjson.dumps(_batch(n)),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        connection.close()


def _post_all(port: int, numbers: list[int], acked: list[int], reached: threading.Event) -> None:
    for n in numbers:
        try:
            status, _ = _post(port, n)
        except (OSError, http.client.HTTPException):
            return  # the process died under us
        if status != 200:
            return
        acked.append(n)
        if len(acked) >= 40:
            reached.set()


def _ready(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except urllib.error.HTTPError:
        return False
    return True


def _wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 60  # a bound against hangs, not a time to meet
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _metrics(port: int) -> dict[str, float]:
    """Every sample of /metrics, by its name with labels as written."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def _commits(port: int) -> int:
    return int(
        sum(v for k, v in _metrics(port).items() if k.startswith("audit_reverser_commits_total"))
    )


def _audit_ids(remote: Path) -> Counter[str]:
    log = git(remote, "log", "--format=%B", "main")
    return Counter(re.findall(r"^Audit-ID: (\S+)$", log, re.M))


def _serve_args(tmp_path: Path, remote: Path, redis: RedisServer, **config: Any) -> list[str]:
    path = write_config(tmp_path / "c.yaml", remote, **config)
    return [
        "--config",
        str(path),
        "--state-dir",
        str(tmp_path / "state"),
        "--journal",
        redis.url,
        "--journal-password-file",
        str(redis.password_file),
    ]


def _refuse_force_pushes(remote: Path) -> None:
    git(remote, "config", "receive.denyNonFastForwards", "true")


@pytest.mark.parametrize("interval", ["100ms", "1h"])
def test_kill_9_and_an_empty_state_dir_lose_nothing_and_duplicate_nothing(
    tmp_path: Path, redis_server: RedisServer, interval: str
) -> None:
    """Pushes every 100ms: the new run skips what the killed one pushed. Every hour: the
    killed run pushed nothing, and everything it acknowledged comes back from Redis."""
    remote = bare_repo(tmp_path / "remote.git")
    _refuse_force_pushes(remote)
    max_commits = 7 if interval == "100ms" else 100_000
    args = _serve_args(tmp_path, remote, redis_server, interval=interval, max_commits=max_commits)
    server = start_serve(tmp_path, *args)
    acked: list[int] = []
    reached = threading.Event()
    sender = threading.Thread(
        target=_post_all, args=(server.port, list(range(BATCHES)), acked, reached)
    )
    sender.start()
    assert reached.wait(timeout=120), "the sender never got 40 answers"
    if interval == "1h":
        # Let it commit everything locally and run a few acknowledgement rounds: one that
        # acknowledged an entry before its push would show below as a shorter stream.
        sender.join(timeout=120)
        _wait_until(lambda: _commits(server.port) == len(acked) * KEPT_PER_BATCH, "commits")
        time.sleep(1.5)
    server.kill()
    sender.join(timeout=60)
    first_run = list(acked)
    assert 40 <= len(first_run) <= BATCHES
    if interval == "1h":  # nothing was pushed, so nothing may have left the stream
        assert git(remote, "rev-list", "--all") == ""
        assert redis_server.command("XLEN", STREAM) == str(len(first_run) * KEPT_PER_BATCH)

    # The mirror is a cache: a start without it reads what is not pushed back from Redis.
    shutil.rmtree(tmp_path / "state")
    server = start_serve(tmp_path, *args, "--shutdown-timeout", "300")
    # Once it holds the lease: a standby's stop leaves the entries in Redis for the next
    # writer (nothing lost), and would test that instead. A stop during the takeover that
    # follows writes them (see the test below).
    _wait_until(lambda: "lease intake: taken by" in server.log.read_text(), "the lease")
    resend = [first_run[-1], *range(first_run[-1] + 1, BATCHES)]  # one 200 lost on the wire
    for n in resend:
        assert _post(server.port, n)[0] == 200
    log = server.stop()
    assert server.process.returncode == 0, log

    ids = _audit_ids(remote)
    expected = {f"id-{n}-{j}" for n in range(BATCHES) for j in range(KEPT_PER_BATCH)}
    # The second run's log says why, should it not have pushed (a CI run once saw it push
    # nothing of what it took, and exit 0).
    assert set(ids) == expected, f"{len(expected - set(ids))} missing; second run:\n{log}"
    assert [i for i, count in ids.items() if count > 1] == []
    assert len(git_files(remote)) == len(ids)
    # Everything pushed was acknowledged: nothing waits in the stream.
    assert redis_server.command("XLEN", STREAM) == "0"


def test_a_stop_during_a_takeover_writes_what_the_killed_writer_left(
    tmp_path: Path, redis_server: RedisServer, git_http: GitHttpServer
) -> None:
    """SIGTERM while the new writer takes over (its remote is slow to answer the takeover's
    fetch): it finishes the takeover and writes what the killed writer left before it exits,
    instead of leaving everything in Redis for a writer that may never come."""
    remote = bare_repo(tmp_path / "remote.git")
    secret = {"username": "bot", "password": git_http.password}
    args = _serve_args(tmp_path, remote, redis_server, url=git_http.url(remote), secret=secret)
    server = start_serve(tmp_path, *args)
    for n in range(3):
        assert _post(server.port, n)[0] == 200
    _wait_until(lambda: _commits(server.port) == 3 * KEPT_PER_BATCH, "commits")
    server.kill()  # pushes every hour: it pushed nothing
    assert git(remote, "rev-list", "--all") == ""

    git_http.answering.clear()  # the takeover's fetch waits from now on
    server = start_serve(tmp_path, *args)
    _wait_until(lambda: "lease intake: taken by" in server.log.read_text(), "the lease")
    server.process.terminate()
    time.sleep(0.5)  # the stop is under way while the takeover waits for the remote
    git_http.answering.set()
    server.process.wait(timeout=300)  # a bound against hangs, not a time to meet
    log = server.log.read_text()
    assert server.process.returncode == 0, log

    ids = _audit_ids(remote)
    assert set(ids) == {f"id-{n}-{j}" for n in range(3) for j in range(KEPT_PER_BATCH)}
    assert max(ids.values()) == 1
    assert redis_server.command("XLEN", STREAM) == "0"


def test_redis_away_means_503_and_not_ready_then_it_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    args = _serve_args(tmp_path, remote, redis_server, interval="100ms")
    server = start_serve(tmp_path, *args)
    assert _post(server.port, 0)[0] == 200

    redis_server.kill()
    status, headers = _post(server.port, 1)
    assert status == 503 and "Retry-After" in headers
    _wait_until(lambda: not _ready(server.port), "/readyz stayed true without Redis")
    status, headers = _post(server.port, 2)
    assert status == 503 and "Retry-After" in headers

    redis_server.start()
    _wait_until(lambda: _ready(server.port), "/readyz stayed false with Redis back")
    assert _post(server.port, 1)[0] == 200
    log = server.stop()
    assert server.process.returncode == 0, log
    assert set(_audit_ids(remote)) == {f"id-{n}-{j}" for n in (0, 1) for j in range(4)}


def test_the_stream_backlog_is_the_limit(tmp_path: Path, redis_server: RedisServer) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    # Nothing is pushed within the test (1h): every entry stays in the stream.
    args = _serve_args(tmp_path, remote, redis_server, interval="1h")
    server = start_serve(tmp_path, *args, "--max-backlog", "10")
    assert _post(server.port, 0)[0] == 200
    assert _post(server.port, 1)[0] == 200
    status, headers = _post(server.port, 2)
    assert status == 429 and "Retry-After" in headers

    # The metrics only a serve with --journal shows (tests/test_metrics.py relies on this).
    _wait_until(lambda: _metrics(server.port).get("audit_reverser_stream_backlog") == 8, "backlog")
    metrics = _metrics(server.port)
    assert {name.split("{")[0] for name in metrics} >= SHARED_JOURNAL_ONLY
    assert metrics['audit_reverser_lease_held{lane="intake"}'] == 1
    assert metrics['audit_reverser_lease_takeovers_total{lane="intake"}'] == 1
    server.stop()


def _serve_fails(tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "audit_reverser",
            "serve",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    return result.stderr


@pytest.mark.parametrize("what", ["wrong password", "unreachable"])
def test_a_redis_we_cannot_use_stops_the_start_in_one_line(
    tmp_path: Path, redis_server: RedisServer, what: str
) -> None:
    url = redis_server.url
    password = tmp_path / "password"
    password.write_text("not-the-password\n")
    if what == "unreachable":
        url = f"redis://127.0.0.1:{free_port()}"
        password = redis_server.password_file
    stderr = _serve_fails(tmp_path, "--journal", url, "--journal-password-file", str(password))
    lines = [line for line in stderr.splitlines() if line.startswith("audit-reverser: error:")]
    assert len(lines) == 1, stderr
    assert ("refused" if what == "wrong password" else "unavailable") in lines[0]
    assert "Traceback" not in stderr
    assert "not-the-password" not in stderr


def test_a_second_replica_is_a_standby_that_answers_and_writes_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A second replica (another state directory) answers the webhook and is ready, but
    the first one, which holds the lease, writes Git; once the first stops, it writes."""
    remote = bare_repo(tmp_path / "remote.git")
    args = _serve_args(tmp_path, remote, redis_server, interval="100ms")
    server = start_serve(tmp_path, *args)
    standby = start_serve(tmp_path, *args, "--state-dir", str(tmp_path / "other"))
    assert _ready(standby.port)
    assert _metrics(standby.port)['audit_reverser_lease_held{lane="intake"}'] == 0
    assert _post(standby.port, 0)[0] == 200
    _wait_until(lambda: git(remote, "rev-list", "--all") != "", "the writer's push")
    _wait_until(lambda: len(_audit_ids(remote)) == KEPT_PER_BATCH, "the writer's push")
    assert _commits(standby.port) == 0 and _commits(server.port) == KEPT_PER_BATCH

    log = server.stop()  # releases the lease: the standby takes over at its next try
    assert server.process.returncode == 0, log
    assert _post(standby.port, 1)[0] == 200
    _wait_until(lambda: len(_audit_ids(remote)) == 2 * KEPT_PER_BATCH, "the new writer's push")
    assert _commits(standby.port) == KEPT_PER_BATCH
    log = standby.stop()
    assert standby.process.returncode == 0, log
    assert max(_audit_ids(remote).values()) == 1


def _service(name: str) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "default", "uid": f"uid-{name}", "resourceVersion": "7"}
    body = {"kind": "Service", "apiVersion": "v1", "metadata": metadata}
    return event("create", resource="services", name=name, body=body, audit_id=f"id-{name}")


def test_a_remote_that_does_not_answer_holds_up_only_its_own_target(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two targets, one on a remote that refuses connections and taking Services only: the
    writer takes over and writes the other target's remote. Only the entries of events that
    went to the first target wait in Redis (acknowledged once pushed); the others leave."""
    remote = bare_repo(tmp_path / "remote.git")
    away = f"http://127.0.0.1:{free_port()}/away.git"  # nobody listens there
    documents = f"""\
---
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: away, namespace: team}}
spec:
  url: {away}
  allowedBranches: ["main"]
  push: {{interval: "100ms", maxCommits: 1}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: away, namespace: team}}
spec: {{providerRef: {{name: away}}, branch: main, path: away}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: away}}
spec:
  targetRef: {{name: away, namespace: team}}
  rules: [{{scope: Namespaced, resources: ["services"]}}]
"""
    args = _serve_args(tmp_path, remote, redis_server, interval="100ms", documents=documents)
    server = start_serve(tmp_path, *args, "--shutdown-timeout", "3")
    services = [_service(name) for name in ("web", "db")]
    body = orjson.dumps(event_list(*services))
    assert request(server.port, "POST", "/audit-webhook", body)[0] == 200
    for n in range(3):
        assert _post(server.port, n)[0] == 200
    expected = {f"id-{n}-{j}" for n in range(3) for j in range(KEPT_PER_BATCH)}
    expected |= {"id-web", "id-db"}
    _wait_until(
        lambda: git(remote, "rev-list", "--all") and set(_audit_ids(remote)) == expected,
        "the reachable remote's pushes",
    )
    assert max(_audit_ids(remote).values()) == 1
    _wait_until(lambda: _commits(server.port) == len(expected) + 2, "the other target's commits")
    # The Services' entries wait for the other remote; the ConfigMaps' are acknowledged.
    _wait_until(lambda: redis_server.command("XLEN", STREAM) == "2", "the acknowledgements")
    log = server.stop()
    assert "taking over on the remote's tip fetched last" in log, log


def test_a_reused_audit_id_is_stored_and_written_as_another_event(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The shared journal knows an event sent again by its Audit-ID and receive time: a
    client's request that reuses an Audit-ID is stored, and written, as the change it is."""
    remote = bare_repo(tmp_path / "remote.git")
    server = start_serve(tmp_path, *_serve_args(tmp_path, remote, redis_server, interval="100ms"))
    first = event("create", name="a", body=configmap("a"), audit_id="chosen")
    again = event(
        "update",
        name="a",
        body=configmap("a", rv="101", data={"v": "2"}),
        audit_id="chosen",
        time="2026-01-02T03:09:00.000001Z",
    )
    for items in ([first], [first], [again]):  # the second: the apiserver retried a batch
        body = orjson.dumps(event_list(*items))
        url = f"http://127.0.0.1:{server.port}/audit-webhook"
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
    _wait_until(
        lambda: git(remote, "rev-list", "--all") and _audit_ids(remote) == {"chosen": 2}, "pushes"
    )
    log = server.stop()
    assert server.process.returncode == 0, log
    assert git(remote, "log", "--reverse", "--format=%s", "main").splitlines() == [
        "[CREATE] v1/configmaps/default/a",
        "[UPDATE] v1/configmaps/default/a",
    ]


def test_journal_options_need_journal(tmp_path: Path) -> None:
    stderr = _serve_fails(tmp_path, "--journal-replicas", "1")
    assert "--journal-replicas needs --journal" in stderr
