"""How the benchmarks start ``serve`` (:func:`start_serve`), and ``python -m audit_reverser``
under tracemalloc, for finding where a benchmark's memory goes.

The benchmarks run ``serve`` through this when ``BENCH_TRACEMALLOC`` names a file: every half
second it appends the traced Python memory and the RSS to ``<file>.log``, and whenever the
traced memory reached a new high (by 10%) it dumps a snapshot to ``<file>``. Read it with

    python -c "import tracemalloc as t; s = t.Snapshot.load('FILE');
    [print(x) for x in s.statistics('traceback')[:10]]"

Not part of the product: tracing slows serve several times over.
"""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

# serve's environment as the image (Dockerfile) sets it: two malloc arenas.
SERVE_ENV = {**os.environ, "MALLOC_ARENA_MAX": "2"}


def serve_command(traced: bool = True) -> list[str]:
    """``python -m audit_reverser`` for a benchmark to start, or this program (serve under
    tracemalloc) when ``traced`` and BENCH_TRACEMALLOC names a file."""
    if traced and os.environ.get("BENCH_TRACEMALLOC"):
        return [sys.executable, str(Path(__file__).resolve())]
    return [sys.executable, "-m", "audit_reverser"]


def start_serve(
    root: Path, config: Path, *extra: str, traced: bool = True, timeout_s: float = 300
) -> tuple[subprocess.Popen[bytes], int]:
    """``serve`` of ``config`` with its state in ``root``/state, on a free port of 127.0.0.1,
    its stderr in ``root``/serve-PORT.log; returns once ``/readyz`` answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    log = root / f"serve-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *serve_command(traced),
                "--log-level",
                "warning",
                "serve",
                "--config",
                str(config),
                "--state-dir",
                str(root / "state"),
                "--listen",
                f"127.0.0.1:{port}",
                *extra,
            ],
            cwd=Path(__file__).resolve().parent.parent,
            stderr=sink,
            env=SERVE_ENV,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit("serve did not start: " + log.read_text()) from None
            time.sleep(0.05)


def _rss_mib() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def _watch(out: str) -> None:
    best = 0
    with open(f"{out}.log", "a") as log:
        while True:
            time.sleep(0.5)
            current, peak = tracemalloc.get_traced_memory()
            print(
                f"{time.time():.1f} traced={current >> 20} MiB peak={peak >> 20} MiB "
                f"rss={_rss_mib()} MiB",
                file=log,
                flush=True,
            )
            if current > best * 1.1:
                best = current
                tracemalloc.take_snapshot().dump(out)


def main() -> None:
    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "12")))
    threading.Thread(target=_watch, args=(os.environ["BENCH_TRACEMALLOC"],), daemon=True).start()
    sys.argv = ["audit_reverser", *sys.argv[1:]]
    runpy.run_module("audit_reverser", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
