"""Several ``serve --journal`` replicas on one Redis, as a user runs them behind one Service:
three real ``serve`` processes, a real ``redis-server`` (AOF fsynced on every write), a real
bare remote behind ``git http-backend`` that refuses non-fast-forward pushes and logs every
update. A sender spreads
batches over the three receivers and sends a batch that was not acknowledged (an error, a
503, a dead replica) to the next one. Meanwhile the writer is SIGKILLed, Redis is killed and
started again, and the next writer is SIGSTOPped past its lease and SIGCONTed. A replica
that exits is started again on its state directory, as Kubernetes restarts a container.

What is checked is what users see: every acknowledged event's Audit-ID is in the remote
exactly once, the history is linear and moved only forward, and a writer that lost its
lease while paused writes nothing and exits for a clean start.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import Served, bare_repo, git, start_serve, write_config
from tests.gitservers import GitHttpServer
from tests.redisserver import RedisServer
from tests.test_ha_failures import _only_forward
from tests.test_ha_serve import KEPT_PER_BATCH, STREAM, _audit_ids, _batch

LEASE_S = 2
EXIT_LEASE_LOST = 75


class Replicas:
    """Three ``serve`` processes, each on its own state directory and port."""

    def __init__(self, tmp_path: Path, args: list[str]) -> None:
        self.tmp_path = tmp_path
        self.args = args
        self.served: dict[str, Served] = {}
        self.exits: dict[str, list[int | None]] = {}
        self.lock = threading.Lock()

    def start(self, name: str) -> None:
        state = self.tmp_path / name
        served = start_serve(self.tmp_path, *self.args, "--state-dir", str(state))
        with self.lock:
            self.served[name] = served

    def ports(self) -> list[int]:
        with self.lock:
            return [s.port for s in self.served.values() if s.process.poll() is None]

    def writer(self, besides: str = "") -> str:
        """The replica that writes now (its log says so last), once it is not ``besides``."""
        deadline = time.monotonic() + 60  # a bound against hangs, not a time to meet
        while time.monotonic() < deadline:
            found = None
            newest = ""
            for name, served in self.served.items():
                if name == besides or served.process.poll() is not None:
                    continue
                lines = [x for x in served.log.read_text().splitlines() if "writes now" in x]
                if lines and lines[-1] > newest:
                    newest, found = lines[-1], name
            if found is not None:
                return found
            time.sleep(0.05)
        raise AssertionError("no replica became the writer")

    def restart_exited(self) -> None:
        """What a kubelet does: a container that exited is started again."""
        for name, served in list(self.served.items()):
            code = served.process.poll()
            if code is not None and code != -signal.SIGKILL:
                self.exits.setdefault(name, []).append(code)
                self.start(name)

    def close(self) -> None:
        for served in self.served.values():
            if served.process.poll() is None:
                served.process.send_signal(signal.SIGCONT)
                served.kill()


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare remote behind ``git http-backend`` that refuses non-fast-forward pushes and logs every
    update."""
    bare = bare_repo(tmp_path / "remote.git")
    git(bare, "config", "receive.denyNonFastForwards", "true")
    git(bare, "config", "core.logAllRefUpdates", "always")
    return bare


@pytest.fixture
def replicas(
    tmp_path: Path, remote: Path, redis_server: RedisServer, git_http: GitHttpServer
) -> Iterator[Replicas]:
    # Over HTTP, so that git's own receive-pack judges every push (fast-forward or not).
    config = write_config(
        tmp_path / "c.yaml",
        remote,
        url=git_http.url(remote),
        secret={"username": "bot", "password": git_http.password},
        interval="100ms",
        max_commits=10,
    )
    made = Replicas(
        tmp_path,
        [
            "--config",
            str(config),
            "--journal",
            redis_server.url,
            "--journal-password-file",
            str(redis_server.password_file),
            "--journal-lease",
            str(LEASE_S),
        ],
    )
    try:
        for name in ("a", "b", "c"):
            made.start(name)
        yield made
    finally:
        made.close()


class Sender:
    """Batches numbered from 0, each sent to the next receiver in turn until one answers
    200 (as the apiserver retries, through a Service, a batch it got no 200 for)."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.acked: list[int] = []
        self.refused = 0
        self._next = 0
        self._turn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        # Receivers that did not answer in time, left out until then: as a Service leaves
        # out a pod whose readiness probe times out.
        self._out: dict[int, float] = {}

    def start(self) -> None:
        self._thread.start()

    def until(self, count: int) -> None:
        """Wait until ``count`` more batches are acknowledged."""
        target = len(self.acked) + count
        deadline = time.monotonic() + 120  # a bound against hangs, not a time to meet
        while len(self.acked) < target:
            assert self._thread.is_alive() and time.monotonic() < deadline, "sender stuck"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self._next
            while not self._send(n):
                self.refused += 1
                time.sleep(0.05)
            self.acked.append(n)
            self._next += 1
            time.sleep(0.01)

    def _send(self, n: int) -> bool:
        now = time.monotonic()
        ports = [p for p in self.replicas.ports() if self._out.get(p, 0.0) < now]
        if not ports:
            return False
        self._turn += 1
        port = ports[self._turn % len(ports)]
        # A frozen replica never answers: the sender gives up on it, as the apiserver does.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            connection.request(
                "POST",
                "/audit-webhook",
                body=orjson.dumps(_batch(n)),
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            return response.status == 200
        except TimeoutError:
            self._out[port] = time.monotonic() + 5
            return False
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()


def _settled(remote: Path, redis: RedisServer, acked: list[int]) -> bool:
    wanted = {f"id-{n}-{j}" for n in acked for j in range(KEPT_PER_BATCH)}
    try:
        empty = redis.command("XLEN", STREAM) == "0"
    except Exception:  # noqa: BLE001 - Redis restarting: ask again
        return False
    return empty and wanted <= set(_audit_ids(remote))


def test_three_replicas_lose_nothing_and_write_nothing_twice_through_faults(
    tmp_path: Path, remote: Path, redis_server: RedisServer, replicas: Replicas
) -> None:
    sender = Sender(replicas)
    sender.start()
    try:
        sender.until(15)
        killed = replicas.writer()
        replicas.served[killed].process.kill()  # SIGKILL mid-stream: no release, no push
        sender.until(15)
        replicas.writer(besides=killed)  # a standby took over while batches kept coming

        redis_server.kill()  # Redis lost mid-stream, and back on its AOF
        time.sleep(0.3)
        redis_server.start()
        sender.until(15)
        replicas.restart_exited()  # a writer that lost its lease with Redis exits

        paused = replicas.writer(besides=killed)
        replicas.served[paused].process.send_signal(signal.SIGSTOP)
        sender.until(15)
        replicas.writer(besides=paused)  # taken over from the frozen writer
        time.sleep(LEASE_S)  # the frozen writer is well past its lease
        replicas.served[paused].process.send_signal(signal.SIGCONT)
        assert replicas.served[paused].process.wait(timeout=60) == EXIT_LEASE_LOST
        resumed = replicas.served[paused].log.read_text()
        assert "another replica writes now" in resumed
        replicas.restart_exited()
        sender.until(15)
    finally:
        sender.stop()

    deadline = time.monotonic() + 120  # a bound against hangs, not a time to meet
    while not _settled(remote, redis_server, sender.acked):
        assert time.monotonic() < deadline, "acknowledged events never reached the remote"
        time.sleep(0.2)

    ids = _audit_ids(remote)
    assert [i for i, count in ids.items() if count > 1] == []
    sent = {f"id-{n}-{j}" for n in range(sender._next + 1) for j in range(KEPT_PER_BATCH)}
    assert set(ids) <= sent
    assert sender.refused > 0  # the sender did meet the faults
    _only_forward(remote)
