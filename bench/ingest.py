"""How fast does a real ``audit-reverser serve`` take audit batches, with the journal on?

One run prints, side by side:
- the kube-apiserver's own ceiling for one webhook backend (batch 400 x 10 QPS = 4,000 events/s),
- the bare rate of ``orjson.loads`` plus the cheap filter on the same bodies in this process
  (the practical limit of any Python receiver),
- events/s through HTTP, triage and the fsynced journal: one sender posting back to back as
  the apiserver does (with p50/p99 latency per 400-event batch), and four senders at once,
- the server's RSS during a sustained run,
- the CPU time ``serve`` spends per event (all its threads, from /proc), against the bare
  parse's: on a shared machine this ratio moves far less than the wall-clock ones.

The server runs on CPU 0 (its event loop, journal and Git threads), the senders on CPU 1.
Batches are realistic: 400 events, mostly reads and watches from real clusters (the corpus),
with two kept writes each (0.5%), every one a new change that becomes a commit.

    python bench/ingest.py [--seconds 20] [--kept 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from traced_serve import start_serve  # bench/, the script's own folder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit_reverser.pipeline.filter import classify_raw  # noqa: E402

CORPUS = REPO / "tests" / "data" / "audit-corpus"
BATCH = 400
KEPT = 2
APISERVER_CEILING = 400 * 10  # events/s: webhook batch max size x throttle QPS
MARK = b"@@@@@@@@@@"  # replaced by the batch number, so every batch carries new changes


def _filtered_events() -> list[dict[str, Any]]:
    """Corpus events the receiver drops (reads, watches, failures), as the webhook sends them."""
    events = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            item = orjson.loads(line)
            item.pop("kind", None)
            item.pop("apiVersion", None)
            if classify_raw(item) is not None:
                events.append(item)
    return events


def _kept(n: int, *, new: bool) -> dict[str, Any]:
    name = f"bench-{n}"
    return {
        "level": "RequestResponse",
        # A new auditID makes a commit; a repeated one is journaled, then skipped as a
        # duplicate: the ingest path alone, with no Git work competing for the core.
        "auditID": f"{MARK.decode() if new else 'repeated'}-kept-{n}",
        "stage": "ResponseComplete",
        "requestURI": f"/api/v1/namespaces/default/configmaps/{name}",
        "verb": "update",
        "user": {"username": "alice@example.com", "groups": ["system:authenticated"]},
        "sourceIPs": ["10.0.0.7"],
        "userAgent": "kubectl/v1.31.0",
        "objectRef": {
            "resource": "configmaps",
            "namespace": "default",
            "name": name,
            "apiVersion": "v1",
        },
        "responseStatus": {"metadata": {}, "code": 200},
        "responseObject": {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": "default",
                "resourceVersion": "1" + MARK.decode(),
            },
            "data": {"generation": MARK.decode()},
        },
        "requestReceivedTimestamp": "2026-11-25T10:00:00.000000Z",
        "stageTimestamp": "2026-11-25T10:00:00.001000Z",
    }


def _template(*, new: bool) -> bytes:
    filtered = _filtered_events()
    items = [filtered[i % len(filtered)] for i in range(BATCH - KEPT)]
    for k in range(KEPT):
        items.insert((k + 1) * BATCH // (KEPT + 1), _kept(k, new=new))
    document = {
        "kind": "EventList",
        "apiVersion": "audit.k8s.io/v1",
        "metadata": {},
        "items": items,
    }
    return orjson.dumps(document)


def _body(template: bytes, n: int) -> bytes:
    return template.replace(MARK, b"%010d" % n)


def bare_rate(template: bytes, seconds: float) -> tuple[float, float]:
    """orjson.loads + the cheap filter, in this process: events/s, and events per CPU second."""
    bodies = [_body(template, n) for n in range(64)]
    events = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for body in bodies:
            for item in orjson.loads(body)["items"]:
                classify_raw(item)
            events += BATCH
    return events / (time.perf_counter() - start), events / (time.process_time() - cpu)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sender:
    """One keep-alive connection posting pre-built requests back to back."""

    def __init__(self, port: int, template: bytes, numbers: range) -> None:
        self.port = port
        self.template = template
        self.numbers = iter(numbers)
        self.latencies: list[float] = []
        self.refused = 0

    async def run(self, until: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (
            "POST /audit-webhook HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            "Content-Length: {}\r\n\r\n"
        )
        for n in self.numbers:
            if time.perf_counter() >= until:
                break
            body = _body(self.template, n)
            start = time.perf_counter()
            writer.write(head.format(len(body)).encode() + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", answer)
            await reader.readexactly(int(length.group(1)) if length else 0)
            self.latencies.append(time.perf_counter() - start)
            if not answer.startswith(b"HTTP/1.1 200"):
                self.refused += 1
                await asyncio.sleep(float(_retry_after(answer)))
        writer.close()


def _retry_after(answer: bytes) -> str:
    found = re.search(rb"(?i)retry-after: (\d+)", answer)
    return found.group(1).decode() if found else "1"


async def load(
    port: int, template: bytes, senders: int, seconds: float, first: int
) -> list[Sender]:
    until = time.perf_counter() + seconds
    per = 10_000_000
    group = [
        Sender(port, template, range(first + i * per, first + (i + 1) * per))
        for i in range(senders)
    ]
    await asyncio.gather(*(s.run(until) for s in group))
    return group


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sustained(
    port: int, template: bytes, pid: int, seconds: float, first: int
) -> list[float]:
    samples: list[float] = []

    async def sample() -> None:
        while True:
            samples.append(rss_mib(pid))
            await asyncio.sleep(1)

    sampler = asyncio.create_task(sample())
    await load(port, template, 1, seconds, first)
    sampler.cancel()
    return samples


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    subprocess.run(
        ["git", "init", "-q", "--bare", "-b", "main", str(root / "remote.git")], check=True
    )
    config = root / "config.yaml"
    config.write_text(f"""\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: bench}}
spec:
  url: file://{root / "remote.git"}
  allowedBranches: ["main"]
  push: {{interval: "5s", maxCommits: 5000}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: live, namespace: bench}}
spec: {{providerRef: {{name: origin}}, branch: main, path: live}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: all}}
spec:
  targetRef: {{name: live, namespace: bench}}
  rules: [{{scope: Namespaced, resources: ["*"]}}, {{scope: Cluster, resources: ["*"]}}]
""")
    server, port = start_serve(root, config, traced=False, timeout_s=30)
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(server.pid, {0})
        os.sched_setaffinity(0, {1})
    return server, port


def _report(
    label: str,
    one: Sender,
    four: list[Sender],
    seconds: float,
    bare: float,
    cpu: tuple[float, float],
) -> None:
    latencies = sorted(one.latencies)
    one_rate = len(latencies) * BATCH / sum(latencies)
    four_rate = sum(len(s.latencies) for s in four) * BATCH / seconds
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    refused = one.refused + sum(s.refused for s in four)
    print(f"{label}:")
    for senders, rate in (("1 sender back to back", one_rate), ("4 senders", four_rate)):
        print(
            f"  {senders + ':':<24}{rate:>10,.0f} events/s  ({rate / bare:.2f}x bare, "
            f"{rate / APISERVER_CEILING:.0f}x the apiserver ceiling)"
        )
    print(f"  ack latency per batch, 1 sender: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"  batches refused (429/503): {refused}")
    serve_cpu, bare_cpu = cpu
    print(
        f"  serve CPU per event, 1 sender: {serve_cpu * 1e6:.2f} us, bare parse "
        f"{bare_cpu * 1e6:.2f} us ({bare_cpu / serve_cpu:.2f}x bare by CPU time)"
    )


def main() -> None:
    global KEPT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--kept", type=int, default=KEPT, help="kept writes per 400-event batch")
    args = parser.parse_args()
    seconds = args.seconds
    KEPT = args.kept
    repeated, new = _template(new=False), _template(new=True)
    print(f"batch: {BATCH} events, {KEPT} kept, {len(new) / 1024:.0f} KiB; {os.cpu_count()} CPUs")

    bare, bare_per_cpu = bare_rate(new, min(seconds, 5))
    print(f"kube-apiserver ceiling (400 x 10 QPS): {APISERVER_CEILING:>10,.0f} events/s")
    print(f"bare orjson.loads + filter, in-process: {bare:>9,.0f} events/s")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        server, port = start_server(root)
        try:
            for label, template, base in (
                ("serve, journal on, kept events repeated (no Git work)", repeated, 0),
                ("serve, journal on, every kept event a new commit", new, 300_000_000),
            ):
                before = cpu_seconds(server.pid)
                one = asyncio.run(load(port, template, 1, seconds, base))[0]
                per_event = (cpu_seconds(server.pid) - before) / (len(one.latencies) * BATCH)
                four = asyncio.run(load(port, template, 4, seconds, base + 100_000_000))
                _report(label, one, four, seconds, bare, (per_event, 1 / bare_per_cpu))
            for label, template, base in (
                ("kept events repeated", repeated, 800_000_000),
                ("new commits", new, 900_000_000),
            ):
                samples = asyncio.run(sustained(port, template, server.pid, seconds * 3, base))
                third = max(1, len(samples) // 3)
                print(
                    f"RSS over {seconds * 3:.0f} s sustained, 1 sender, {label}: first third max "
                    f"{max(samples[:third]):.0f} MiB, last third max "
                    f"{max(samples[-third:]):.0f} MiB"
                )
        finally:
            server.terminate()
            server.wait(timeout=120)


if __name__ == "__main__":
    main()
