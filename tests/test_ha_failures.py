"""Three replica processes drive one lane into a real bare Git remote while a sender appends
to a real redis-server; the active writer is SIGKILLed, Redis is SIGKILLed and restarted,
and another writer is SIGSTOPped past its lease and SIGCONTed. Every acknowledged event ends
up in the remote exactly once, in a linear history that only ever moved forward."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from audit_reverser.ha.connection import Connection, JournalSettings, RedisUnavailable, connect
from audit_reverser.ha.stream import Incoming, StreamJournal
from tests.conftest import REPO_ROOT
from tests.hareplica import LANE
from tests.redisserver import RedisServer

LEASE_S = 1.0
BATCH = 5


def _git(*args: str | Path) -> str:
    return subprocess.run(
        ["git", *map(str, args)], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Path]:
    """A bare repository that refuses non-fast-forward pushes and logs every update."""
    bare = tmp_path / "remote.git"
    _git("init", "-q", "--bare", "-b", "main", bare)
    _git("-C", bare, "config", "receive.denyNonFastForwards", "true")
    _git("-C", bare, "config", "core.logAllRefUpdates", "always")
    seed = tmp_path / "seed"
    _git("clone", "-q", bare, seed)
    (seed / "README").write_text("audit trail\n")
    _git("-C", seed, "add", "README")
    _git(
        "-C",
        seed,
        "-c",
        "user.name=seed",
        "-c",
        "user.email=seed@example.com",
        "commit",
        "-q",
        "-m",
        "start",
    )
    _git("-C", seed, "push", "-q", "origin", "main")
    yield bare


@pytest.fixture
def workdirs(remote: Path, tmp_path: Path) -> dict[str, Path]:
    made = {}
    for name in ("replica-a", "replica-b", "replica-c"):
        work = tmp_path / name
        _git("clone", "-q", remote, work)
        _git("-C", work, "config", "user.name", name)
        _git("-C", work, "config", "user.email", f"{name}@example.com")
        made[name] = work
    return made


@pytest.fixture
async def replicas(
    redis_server: RedisServer, workdirs: dict[str, Path], tmp_path: Path
) -> AsyncIterator[dict[str, asyncio.subprocess.Process]]:
    started = {}
    for name, work in workdirs.items():
        log = await asyncio.to_thread(open, tmp_path / f"{name}.log", "wb")
        started[name] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.hareplica",
            redis_server.url,
            str(redis_server.password_file),
            str(work),
            name,
            str(LEASE_S),
            stderr=log,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
    yield started
    for process in started.values():
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            await process.wait()


async def _holder(connection: Connection, *, besides: str = "") -> str:
    """The replica whose lease is in Redis now, once it is not ``besides``."""
    while True:
        try:
            with connection.errors("reading the lease"):
                value = await connection.client.get(f"audit-reverser:lease:{LANE}")
        except RedisUnavailable:  # restarting: ask again
            value = None
        if value and value.decode().split(":", 1)[1] != besides:
            return str(value.decode().split(":", 1)[1])
        await asyncio.sleep(0.05)


async def _history(remote: Path) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(remote),
        "log",
        "--format=%(trailers:key=Audit-ID,valueonly)",
        "main",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return [line.strip() for line in out.decode().splitlines() if line.strip()]


async def test_every_acknowledged_event_is_in_the_remote_once(
    replicas: dict[str, asyncio.subprocess.Process],
    redis_server: RedisServer,
    remote: Path,
) -> None:
    connection = await connect(
        JournalSettings(url=redis_server.url, password_file=redis_server.password_file)
    )
    journal = StreamJournal(connection)
    acknowledged: list[str] = []
    refused = 0

    async def send(numbers: range) -> None:
        nonlocal refused
        for start in range(numbers.start, numbers.stop, BATCH):
            ids = [f"audit-{n}" for n in range(start, start + BATCH)]
            batch = [
                Incoming(audit_id=i, cluster="", event=orjson.dumps({"auditID": i}), lanes=(LANE,))
                for i in ids
            ]
            while True:  # as the apiserver does: a batch not acknowledged is sent again
                try:
                    await journal.append(batch)
                    break
                except RedisUnavailable:
                    refused += 1
                    await asyncio.sleep(0.1)
            acknowledged.extend(ids)
            await asyncio.sleep(0.02)

    try:
        await send(range(40))
        killed = await _holder(connection)
        replicas[killed].kill()  # SIGKILL mid-stream: no release, no last push
        await send(range(40, 80))
        await _holder(connection, besides=killed)  # taken over while the sender went on

        await asyncio.to_thread(redis_server.kill)
        sending = asyncio.create_task(send(range(80, 120)))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_server.start)
        await sending

        paused = await _holder(connection, besides=killed)
        replicas[paused].send_signal(signal.SIGSTOP)
        await send(range(120, 160))
        await _holder(connection, besides=paused)
        replicas[paused].send_signal(signal.SIGCONT)
        await send(range(160, 200))

        async def converged() -> list[str]:
            while True:
                history = await _history(remote)
                if set(acknowledged) <= set(history) and not await journal.backlog():
                    return history
                await asyncio.sleep(0.2)

        history = await asyncio.wait_for(converged(), 120)
    finally:
        await connection.close()

    counts = Counter(history)
    assert [i for i, n in counts.items() if n > 1] == []
    assert set(history) == set(acknowledged)
    assert refused > 0  # the sender did meet the Redis outage
    await asyncio.to_thread(_only_forward, remote)


def _only_forward(remote: Path) -> None:
    """A linear history that only moved forward: no merges, every update a fast-forward."""
    assert _git("-C", remote, "rev-list", "--merges", "main") == ""
    updates = (remote / "logs" / "refs" / "heads" / "main").read_text().splitlines()
    assert len(updates) >= 2  # the seed, then the writers' pushes
    for line in updates[1:]:
        old, new = line.split()[:2]
        forward = ["git", "-C", str(remote), "merge-base", "--is-ancestor", old, new]
        assert subprocess.run(forward).returncode == 0, line
