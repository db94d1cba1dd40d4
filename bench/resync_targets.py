"""What does one shared listing save when several GitTargets select the same resources?

kmock serves N ConfigMaps from a process of its own (started through
bench/resync_loop.py); T GitTargets on one repository each select every ConfigMap. The
reference, measured in the same run, is each target resynced on its own (one listing per
target, as resyncs were before); the subject is one resync of all targets (one listing
shared). Both run on a fresh repository (every file written) and again (nothing differs).

    python bench/resync_targets.py [--objects 3000] [--targets 3]
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

from audit_reverser.cluster.api import KubeApi  # noqa: E402
from audit_reverser.cluster.objects import ApiObjects  # noqa: E402
from audit_reverser.config import load_config  # noqa: E402
from audit_reverser.runtime import Runtime, Settings  # noqa: E402
from tests.conftest import bare_repo  # noqa: E402

PROVIDER = """\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: default}}
spec: {{url: "file://{remote}", allowedBranches: ["main"]}}
"""
TARGET = """\
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: t{i}, namespace: default}}
spec: {{providerRef: {{name: origin}}, branch: main, path: t{i}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: t{i}}}
spec:
  targetRef: {{name: t{i}, namespace: default}}
  rules: [{{scope: Namespaced, resources: ["configmaps"]}}]
"""


async def measure(server: str, folder: Path, targets: int, shared: bool) -> list[float]:
    """Seconds of a first and a second round over every target."""
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
        rules = PROVIDER.format(remote=remote)
        rules += "".join(TARGET.format(i=i) for i in range(targets))
        (folder / "rules.yaml").write_text(rules)
        config = load_config([folder / "rules.yaml"])
        return Runtime(config, Settings(state_dir=folder / "state"))

    runtime = await asyncio.to_thread(prepare)
    await runtime.start()
    objects = ApiObjects(api)
    took = []
    try:
        every = list(runtime.config.targets.values())
        for _ in range(2):
            begin = time.perf_counter()
            if shared:
                await runtime.resync(every, api, objects)
            else:
                for target in every:
                    await runtime.resync([target], api, objects)
            took.append(time.perf_counter() - begin)
    finally:
        await runtime.close()
        await api.close()
    return took


async def compare(server: str, targets: int) -> dict[str, list[float]]:
    rows = {}
    for label, shared in (("one listing per target", False), ("one shared listing", True)):
        with tempfile.TemporaryDirectory() as folder:
            rows[label] = await measure(server, Path(folder), targets, shared)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=3000)
    parser.add_argument("--targets", type=int, default=3)
    args = parser.parse_args()
    child = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "bench" / "resync_loop.py"),
            "--serve-kmock",
            str(args.objects),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        rows = asyncio.run(compare(child.stdout.readline().strip(), args.targets))
    finally:
        child.stdin.close()
        child.wait()
    print(f"resync of {args.objects} ConfigMaps into {args.targets} GitTargets")
    for label, runs in rows.items():
        first, second = runs
        print(f"  {label:23} writes all {first:6.2f} s   unchanged {second:6.2f} s")
    reference, subject = rows["one listing per target"], rows["one shared listing"]
    for i, name in enumerate(("writes all", "unchanged")):
        print(f"  per target / shared ({name}): {reference[i] / subject[i]:.2f}x")


if __name__ == "__main__":
    main()
