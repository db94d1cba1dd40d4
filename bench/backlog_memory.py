"""Peak memory of a real ``audit-reverser serve`` while Git falls behind a burst of writes.

The remote hangs (a TCP server that accepts and never answers, as a Git host that stopped
responding): the writer waits on its first fetch, so every accepted event stays in the
backlog. One sender posts a burst of kept writes (``--writes``, 80,000 by default; 400 per
batch, each a new ConfigMap) back to back, as the apiserver does. Then:

1. burst: peak RSS (VmHWM from /proc/PID/status) of ``serve`` over the burst;
2. kill -9, and a restart with the same backlog in the journal and the remote still hung:
   peak RSS once it is ready and has read what it may;
3. kill -9, and a restart with a remote that answers (a bare repository; a new provider URL,
   so a fresh mirror): how long until the whole backlog is committed locally, and until it
   is pushed, with the peak RSS at each point; every event is then checked to be in the
   remote exactly once.

The deployment's memory limit (deploy/base/deployment.yaml) is printed beside the figures.

    python bench/backlog_memory.py [--writes 80000] [--no-drain]

Step 3 takes minutes for 80,000 writes: committing and pushing them is Git's work.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from traced_serve import start_serve  # bench/, the script's own folder

BATCH = 400
LIMIT_MIB = 512  # deploy/base/deployment.yaml: resources.limits.memory


def _write(n: int) -> dict[str, Any]:
    name = f"burst-{n}"
    return {
        "level": "RequestResponse",
        "auditID": f"burst-{n:08d}",
        "stage": "ResponseComplete",
        "requestURI": f"/api/v1/namespaces/default/configmaps/{name}",
        "verb": "create",
        "user": {"username": "alice@example.com", "groups": ["system:authenticated"]},
        "sourceIPs": ["10.0.0.7"],
        "userAgent": "kubectl/v1.31.0",
        "objectRef": {
            "resource": "configmaps",
            "namespace": "default",
            "name": name,
            "apiVersion": "v1",
        },
        "responseStatus": {"metadata": {}, "code": 201},
        "responseObject": {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": "default",
                "resourceVersion": str(1000 + n),
                "labels": {"app": "burst", "tier": "bench"},
            },
            "data": {"config.yaml": f"replicas: {n % 7}\nimage: example/app:{n}\n" * 8},
        },
        "requestReceivedTimestamp": "2026-11-25T10:00:00.000000Z",
        "stageTimestamp": "2026-11-25T10:00:00.001000Z",
    }


def _body(first: int) -> bytes:
    items = [_write(n) for n in range(first, first + BATCH)]
    document = {"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": items}
    return orjson.dumps(document)


class Tarpit:
    """A remote that accepts connections and never answers."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.held.append(connection)


def _config(path: Path, url: str) -> Path:
    path.write_text(f"""\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: bench}}
spec:
  url: {url}
  allowedBranches: ["main"]
  push: {{interval: "5s", maxCommits: 20000}}
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
  rules: [{{scope: Namespaced, resources: ["*"]}}]
""")
    return path


class Serve:
    def __init__(self, root: Path, config: Path, *extra: str, traced: bool = False) -> None:
        self.process, self.port = start_serve(root, config, *extra, traced=traced)
        self.log = root / f"serve-{self.port}.log"

    def memory_mib(self, field: str) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def gauge(self, name: str) -> float:
        """A metric summed over its labels (NaN when the server has no such metric)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics").read().decode()
        found = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return sum(float(value) for value in found) if found else float("nan")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def burst(port: int, writes: int) -> tuple[float, int]:
    """Post the burst on one keep-alive connection; returns seconds and batches refused."""
    connection = socket.create_connection(("127.0.0.1", port))
    stream = connection.makefile("rb")
    refused = 0
    start = time.perf_counter()
    first = 0
    while first < writes:
        body = _body(first)
        head = (
            "POST /audit-webhook HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        connection.sendall(head.encode() + body)
        status = stream.readline()
        length = 0
        while (line := stream.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        stream.read(length)
        if status.startswith(b"HTTP/1.1 200"):
            first += BATCH
        else:
            refused += 1
            time.sleep(1)  # Retry-After
    connection.close()
    return time.perf_counter() - start, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=80_000, help="kept writes in the burst")
    parser.add_argument("--no-drain", action="store_true", help="skip step 3")
    args = parser.parse_args()
    writes = args.writes - args.writes % BATCH
    tarpit = Tarpit()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        hung = _config(root / "hung.yaml", f"http://127.0.0.1:{tarpit.port}/remote.git")
        remote = root / "remote.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
        answering = _config(root / "answering.yaml", f"file://{remote}")

        server = Serve(root, hung)
        try:
            seconds, refused = burst(server.port, writes)
            backlog = server.gauge("audit_reverser_journal_backlog")
            print(
                f"burst: {writes:,} writes in {seconds:.1f} s ({writes / seconds:,.0f}/s), "
                f"{refused} batches refused; backlog {backlog:,.0f}, in memory "
                f"{server.gauge('audit_reverser_events_in_memory'):,.0f} (peak "
                f"{server.gauge('audit_reverser_events_in_memory_peak'):,.0f})"
            )
            print(
                f"  serve peak RSS {server.memory_mib('VmHWM'):.0f} MiB, now "
                f"{server.memory_mib('VmRSS'):.0f} MiB (limit {LIMIT_MIB} MiB)"
            )
        finally:
            server.kill()

        server = Serve(root, hung)
        try:
            time.sleep(3)  # the intake reads what its window takes
            print(
                f"restart with the backlog, remote still hung: peak RSS "
                f"{server.memory_mib('VmHWM'):.0f} MiB; backlog "
                f"{server.gauge('audit_reverser_journal_backlog'):,.0f}, in memory "
                f"{server.gauge('audit_reverser_events_in_memory'):,.0f}"
            )
        finally:
            server.kill()

        if args.no_drain:
            return
        server = Serve(root, answering, "--shutdown-timeout", "600", traced=True)
        start = time.perf_counter()
        try:
            while server.gauge("audit_reverser_journal_backlog") > 0:
                time.sleep(0.2)
            drained = time.perf_counter() - start
            print(
                f"restart with the backlog, remote answering: committed locally in "
                f"{drained:.1f} s ({writes / drained:,.0f}/s), peak RSS "
                f"{server.memory_mib('VmHWM'):.0f} MiB"
            )
            while server.gauge("audit_reverser_unpushed_commits") > 0:
                time.sleep(0.2)
            pushed = time.perf_counter() - start
            print(
                f"  and pushed in {pushed:.1f} s ({writes / pushed:,.0f}/s), peak RSS "
                f"{server.memory_mib('VmHWM'):.0f} MiB"
            )
        finally:
            server.process.terminate()
            server.process.wait()
        log = subprocess.run(
            ["git", "-C", str(remote), "log", "--format=%B", "main"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        ids = Counter(re.findall(r"^Audit-ID: (\S+)$", log, re.M))
        twice = sum(1 for count in ids.values() if count > 1)
        print(f"  in the remote: {len(ids):,} of {writes:,} events, {twice} more than once")


if __name__ == "__main__":
    main()
