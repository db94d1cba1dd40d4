"""What the shared journal costs: appends to a Redis Stream (``serve --journal redis://``)
against the local file journal, the Redis memory an event takes while it waits for Git, and
how long a lane takes to get a new writer after its holder dies.

Both journals get the same batches of real-shaped kept events (a ConfigMap update, ~1 KB of
JSON), from 1 and from 8 concurrent senders, and each batch is awaited until durable (file:
fdatasync; Redis: a local ``redis-server`` with ``appendonly yes``, ``appendfsync always``).
It prints events/s for each and Redis' rate as a ratio of the file journal's, measured in
the same run on the same disk.

Memory: N events appended and never acknowledged; ``INFO memory`` before and after gives
bytes per waiting event (stream entry + seen-key), and ``MEMORY USAGE`` splits it.

Failover: a holder process keeps a lane's lease and is SIGKILLed; the time until another
replica holds the lease, against the lease time (it should be at most lease + lease/3).
Then the same through ``serve``: two ``serve --journal`` replicas on a bare remote, the
writer SIGKILLed, a batch sent to the standby at once; the time from the SIGKILL to the
standby's first push (the remote's branch moving), against the lease time.

    python bench/ha_journal.py [--batches 300] [--batch 20] [--waiting 10000] [--lease 3]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit_reverser.ha.connection import Connection, JournalSettings, connect  # noqa: E402
from audit_reverser.ha.lease import Lease  # noqa: E402
from audit_reverser.ha.stream import Incoming, StreamJournal  # noqa: E402
from audit_reverser.journal import Journal  # noqa: E402
from tests.conftest import (  # noqa: E402
    bare_repo,
    configmap,
    event,
    event_list,
    start_serve,
    write_config,
)
from tests.redisserver import RedisServer  # noqa: E402

LANE = "https://git.example/org/repo.git@main"


def _event(n: int) -> bytes:
    name = f"bench-{n}"
    return orjson.dumps(
        {
            "level": "RequestResponse",
            "auditID": f"5e0c8d4e-{n:012d}",
            "stage": "ResponseComplete",
            "requestURI": f"/api/v1/namespaces/default/configmaps/{name}",
            "verb": "update",
            "user": {"username": "alice@example.com", "groups": ["system:authenticated"]},
            "sourceIPs": ["10.0.0.7"],
            "userAgent": "kubectl/v1.31.0",
            "objectRef": {"resource": "configmaps", "namespace": "default", "name": name},
            "responseStatus": {"metadata": {}, "code": 200},
            "responseObject": {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": {"name": name, "namespace": "default", "resourceVersion": str(n)},
                "data": {"settings.yaml": "x" * 512},
            },
            "requestReceivedTimestamp": "2026-11-25T10:00:00.000000Z",
            "stageTimestamp": "2026-11-25T10:00:00.001000Z",
        }
    )


Batch = list[tuple[str, bytes]]  # (auditID, event JSON) of one request


def _batches(count: int, size: int, first: int) -> list[Batch]:
    return [
        [(f"5e0c8d4e-{n:012d}", _event(n)) for n in range(first + b * size, first + (b + 1) * size)]
        for b in range(count)
    ]


async def _run(
    senders: int, batches: list[Batch], append: Callable[[Batch], Awaitable[None]]
) -> float:
    queue = list(batches)
    start = time.perf_counter()

    async def sender() -> None:
        while queue:
            await append(queue.pop())

    await asyncio.gather(*(sender() for _ in range(senders)))
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


async def file_rate(directory: Path, batches: list[Batch], senders: int) -> float:
    journal = Journal(directory)
    await asyncio.to_thread(journal.recover)

    async def append(batch: Batch) -> None:
        await journal.append([(audit_id, "", event) for audit_id, event in batch])

    try:
        return await _run(senders, batches, append)
    finally:
        await journal.close()


async def redis_rate(connection: Connection, batches: list[Batch], senders: int) -> float:
    journal = StreamJournal(connection)

    async def append(batch: Batch) -> None:
        await journal.append(
            [Incoming(audit_id=a, cluster="", event=e, lanes=(LANE,)) for a, e in batch]
        )

    return await _run(senders, batches, append)


async def memory(connection: Connection, waiting: int) -> None:
    client = connection.client
    await client.flushall()
    before = int((await client.info("memory"))["used_memory"])
    journal = StreamJournal(connection)
    for batch in _batches(waiting // 100, 100, 10_000_000):
        await journal.append(
            [Incoming(audit_id=a, cluster="", event=e, lanes=(LANE,)) for a, e in batch]
        )
    after = int((await client.info("memory"))["used_memory"])
    stream = int(await client.memory_usage(journal.stream_key(LANE)) or 0)
    seen_key = f"{journal.prefix}:seen:/5e0c8d4e-{10_000_000:012d}"
    seen = int(await client.memory_usage(seen_key) or 0)
    print(
        f"memory: {waiting} waiting events of {len(_event(0))} bytes of JSON: "
        f"{(after - before) / waiting:.0f} bytes each in Redis "
        f"(stream {stream / waiting:.0f}/event, seen-key {seen}), "
        f"{(after - before) / 2**20:.1f} MiB in all"
    )


HOLDER = """
import asyncio, sys
from pathlib import Path
from audit_reverser.ha.connection import JournalSettings, connect
from audit_reverser.ha.lease import Lease

async def main():
    connection = await connect(JournalSettings(url=sys.argv[1], password_file=Path(sys.argv[2])))
    lease = Lease(connection, sys.argv[3], "doomed", lease_s=float(sys.argv[4]))
    await lease.keep(lambda held: print("held", flush=True))

asyncio.run(main())
"""


async def failover(server: RedisServer, lease_s: float) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        server.url,
        str(server.password_file),
        LANE,
        str(lease_s),
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None
    await process.stdout.readline()
    connection = await connect(JournalSettings(url=server.url, password_file=server.password_file))
    try:
        successor = Lease(connection, LANE, "successor", lease_s=lease_s)
        process.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        await process.wait()
        # A waiting replica tries as often as its keeper would: three times per lease time.
        while not await successor.acquire():  # noqa: ASYNC110 - a key expiring in Redis
            await asyncio.sleep(lease_s / 3)
        taken = time.perf_counter() - killed
    finally:
        await connection.close()
    print(
        f"failover: lease {lease_s:.1f}s, new writer {taken:.2f}s after SIGKILL "
        f"({taken / lease_s:.2f} x lease; at most 1.33 expected)"
    )


def _tip(remote: Path) -> str:
    found = subprocess.run(
        ["git", "-C", str(remote), "rev-parse", "-q", "--verify", "refs/heads/main"],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip()


def _post(port: int, name: str) -> int:
    import http.client

    body = orjson.dumps(event_list(event("create", name=name, body=configmap(name))))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", "/audit-webhook", body=body, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def serve_failover(server: RedisServer, lease_s: float, directory: Path) -> None:
    remote = bare_repo(directory / "remote.git")
    config = write_config(directory / "c.yaml", remote, interval="100ms", max_commits=1)
    args = [
        "--config",
        str(config),
        "--journal",
        server.url,
        "--journal-password-file",
        str(server.password_file),
        "--journal-lease",
        str(lease_s),
    ]
    writer = start_serve(directory, *args, "--state-dir", str(directory / "a"))
    standby = start_serve(directory, *args, "--state-dir", str(directory / "b"))
    try:
        assert _post(writer.port, "before") == 200
        while not _tip(remote):  # the writer (the first replica) pushed it
            time.sleep(0.01)
        pushed = _tip(remote)
        writer.process.kill()
        killed = time.perf_counter()
        assert _post(standby.port, "after") == 200  # the standby stores it for the writer
        while _tip(remote) == pushed:
            time.sleep(0.01)
        taken = time.perf_counter() - killed
    finally:
        writer.kill()
        standby.stop()
    print(
        f"failover through serve: lease {lease_s:.1f}s, first push of the new writer "
        f"{taken:.2f}s after SIGKILL of the old one ({taken / lease_s:.2f} x lease)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--lease", type=float, default=3.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis")
        await asyncio.to_thread(server.start)
        connection = await connect(
            JournalSettings(url=server.url, password_file=server.password_file)
        )
        try:
            first = 0
            for senders in (1, 8):
                batches = _batches(options.batches, options.batch, first)
                first += options.batches * options.batch
                file = await file_rate(Path(tmp) / f"journal-{senders}", batches, senders)
                batches = _batches(options.batches, options.batch, first)
                first += options.batches * options.batch
                shared = await redis_rate(connection, batches, senders)
                print(
                    f"append, {senders} sender(s), batches of {options.batch}: file journal "
                    f"{file:,.0f} events/s, Redis stream {shared:,.0f} events/s "
                    f"({shared / file:.2f} x file)"
                )
            await memory(connection, options.waiting)
            await failover(server, options.lease)
            await asyncio.to_thread(serve_failover, server, options.lease, Path(tmp))
        finally:
            await connection.close()
            await asyncio.to_thread(server.stop)


if __name__ == "__main__":
    asyncio.run(main())
