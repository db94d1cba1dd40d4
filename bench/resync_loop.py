"""Does a resync of a large cluster keep the event loop free for webhook requests?

kmock serves N ConfigMaps from a process of its own (its page rendering must not count as
ours); a runtime on a bare repository resyncs them twice (the first run writes every file,
the second finds nothing to change), while a ticker task measures the longest pause the
event loop had. The same runs with listing never yielding between objects are the
reference, so the ratio shows what yielding buys. kmock ignores ``limit`` (one page of all
N objects): the decoding of that page is a pause of its own that a real apiserver's pages of
500 divide by N/500.

    python bench/resync_loop.py [--objects 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit_reverser.cluster import snapshot  # noqa: E402
from audit_reverser.cluster.api import KubeApi  # noqa: E402
from audit_reverser.cluster.objects import ApiObjects  # noqa: E402
from audit_reverser.config import load_config  # noqa: E402
from audit_reverser.runtime import Runtime, Settings  # noqa: E402
from tests.conftest import bare_repo, configmap, write_config  # noqa: E402


async def serve_kmock(objects: int) -> None:
    """The child: kmock with ``objects`` ConfigMaps; prints its URL, serves until stdin ends."""
    import kmock

    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources["v1/configmaps"] = kmock.ResourceInfo(
            kind="ConfigMap", namespaced=True, verbs={"get", "list"}
        )
        for i in range(objects):
            data = {f"key-{k}": f"value {i} {k} " * 4 for k in range(8)}
            emulator.objects["v1/configmaps", f"ns-{i % 20}", f"cm-{i}"] = configmap(
                f"cm-{i}", namespace=f"ns-{i % 20}", data=data, rv=str(1000 + i)
            )
        print(str(server.url).rstrip("/"), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def longest_pause(stop: asyncio.Event) -> float:
    loop = asyncio.get_running_loop()
    worst = 0.0
    last = loop.time()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = loop.time()
        worst = max(worst, now - last)
        last = now
    return worst


async def measure(server: str, folder: Path) -> list[tuple[float, float]]:
    """(seconds, longest loop pause) of a first and a second resync."""
    kubeconfig: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u"}}],
        "current-context": "k",
    }
    api = await KubeApi.from_dict(kubeconfig)

    def prepare() -> Runtime:
        remote = bare_repo(folder / "remote.git")
        config = load_config([write_config(folder / "c.yaml", remote)])
        return Runtime(config, Settings(state_dir=folder / "state"))

    runtime = await asyncio.to_thread(prepare)
    await runtime.start()
    results = []
    try:
        [target] = runtime.config.targets.values()
        for _ in range(2):
            stop = asyncio.Event()
            ticker = asyncio.create_task(longest_pause(stop))
            begin = time.perf_counter()
            await runtime.resync([target], api, ApiObjects(api))
            took = time.perf_counter() - begin
            stop.set()
            results.append((took, await ticker))
    finally:
        await runtime.close()
        await api.close()
    return results


async def compare(server: str) -> dict[str, list[tuple[float, float]]]:
    rows = {}
    for label, every in (("yielding", snapshot.YIELD_EVERY), ("never yielding", 10**9)):
        snapshot.YIELD_EVERY = every
        with tempfile.TemporaryDirectory() as folder:
            rows[label] = await measure(server, Path(folder))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--serve-kmock", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_kmock:
        asyncio.run(serve_kmock(args.serve_kmock))
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-kmock", str(args.objects)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        rows = asyncio.run(compare(child.stdout.readline().strip()))
    finally:
        child.stdin.close()
        child.wait()
    print(f"resync of {args.objects} ConfigMaps (kmock in its own process)")
    for label, runs in rows.items():
        for name, (took, pause) in zip(("writes all", "unchanged"), runs, strict=True):
            print(
                f"  {label:15} {name:10} {took:6.2f} s  {args.objects / took:7.0f} objects/s  "
                f"longest loop pause {pause * 1000:6.1f} ms"
            )
    for i, name in enumerate(("writes all", "unchanged")):
        ratio = rows["never yielding"][i][1] / rows["yielding"][i][1]
        print(f"  longest pause, never yielding / yielding ({name}): {ratio:.1f}x")


if __name__ == "__main__":
    main()
