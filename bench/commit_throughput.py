"""How fast does the branch writer commit, against ``git fast-import`` doing the same commits?

For repositories of 1k, 10k and 100k files in our layout
(``clusters/prod/{group/}{version}/{resource}/{namespace}/{name}.yaml``, 50 files per
folder), one run makes the same single-file commits (one changed file each, as the pipeline
makes them) three ways, each on its own copy of the same starting repository:

- ``git fast-import`` reading a prepared stream (the reference: C, one pack at the end),
- our ``Mirror`` (commits built in memory, one pack per batch of 256 as the writer saves),
- a plain pygit2 loop (TreeBuilder per level, libgit2 loose objects), for context.

fast-import and ours run three times each, on fresh copies; the best run counts.

It prints commits/s, our ratio to fast-import, and each method's cost per commit at 100k
files relative to 1k. Both sides must end on the same commit id (byte-identical history),
which the script checks. A last line times pushing the commits to a bare repository.

``--long-run N`` instead makes N single-file commits (updates of random files in a
10k-file repository, so that only the history grows) the way the writer drains a backlog:
batches of 256, each saved and pushed to a local bare repository, packs merged as they pile
up. It prints commits/s for
each tenth of the run (flat means upkeep does not grow with the history), the packs in the
mirror at the end and the share of time in committing, saving and pushing.

    python bench/commit_throughput.py [--commits 2000] [--sizes 1000,10000,100000]
    python bench/commit_throughput.py --long-run 200000
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pygit2
from pygit2.enums import FileMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit_reverser.gitstore.repository import Mirror  # noqa: E402
from audit_reverser.gitstore.transport import LocalTransport  # noqa: E402
from audit_reverser.gitstore.types import FileChange, Identity  # noqa: E402

RUNS = 3  # fast-import and ours: best of three, each on a fresh copy (the loose loop runs once)
BATCH = 256  # the writer's batch: one save (pack + branch update) per batch
PER_FOLDER = 50
RESOURCES = [
    "v1/configmaps",
    "v1/services",
    "v1/serviceaccounts",
    "apps/v1/deployments",
    "apps/v1/statefulsets",
    "batch/v1/cronjobs",
    "networking.k8s.io/v1/ingresses",
    "rbac.authorization.k8s.io/v1/roles",
    "rbac.authorization.k8s.io/v1/rolebindings",
    "policy/v1/poddisruptionbudgets",
]
COMMITTER = Identity(name="audit-reverser", email="audit-reverser@audit-reverser.invalid")
START = 1_767_225_600  # 2026-01-01T00:00:00Z


def layout(files: int) -> list[str]:
    namespaces = max(1, files // (len(RESOURCES) * PER_FOLDER))
    paths = []
    for resource in RESOURCES:
        for ns in range(namespaces):
            for n in range(PER_FOLDER):
                paths.append(f"clusters/prod/{resource}/team-{ns:03d}/app-{n:02d}.yaml")
    return paths[:files]


def content(path: str, version: int) -> bytes:
    name = path.rsplit("/", 1)[1].removesuffix(".yaml")
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: ns\n"
        f"  labels:\n    app.kubernetes.io/name: {name}\n    app.kubernetes.io/part-of: shop\n"
        f"data:\n  version: '{version}'\n  settings.yaml: |\n    replicas: {version % 7}\n"
        f"    image: registry.example.com/{name}:1.{version}\n    timeout: 30s\n"
    ).encode()


def changes(paths: list[str], count: int) -> list[FileChange]:
    rnd = random.Random(42)
    made = []
    for i in range(count):
        path = rnd.choice(paths)
        user = f"user-{rnd.randrange(20)}"
        made.append(
            FileChange(
                path=path,
                content=content(path, i + 1),
                message=f"[UPDATE] {path.removeprefix('clusters/prod/')}\n\nAudit-ID: a-{i}\n",
                author=Identity(name=user, email=f"{user}@example.com"),
                time=datetime.fromtimestamp(START + i, UTC),
            )
        )
    return made


def _data(payload: bytes) -> bytes:
    return b"data %d\n%s\n" % (len(payload), payload)


def _committer(when: int) -> bytes:
    return b"committer %s <%s> %d +0000\n" % (
        COMMITTER.name.encode(),
        COMMITTER.email.encode(),
        when,
    )


def base_stream(paths: list[str]) -> bytes:
    parts = [
        b"commit refs/heads/main\n",
        b"committer %s <%s> %d +0000\n"
        % (COMMITTER.name.encode(), COMMITTER.email.encode(), START),
        _data(b"initial\n"),
    ]
    for path in paths:
        parts.append(b"M 100644 inline %s\n" % path.encode())
        parts.append(_data(content(path, 0)))
    return b"".join(parts)


def commit_stream(made: list[FileChange]) -> bytes:
    parts = []
    for i, change in enumerate(made):
        assert change.content is not None
        when = int(change.time.timestamp())
        parts += [
            b"commit refs/heads/main\n",
            b"author %s <%s> %d +0000\n"
            % (change.author.name.encode(), change.author.email.encode(), when),
            b"committer %s <%s> %d +0000\n"
            % (COMMITTER.name.encode(), COMMITTER.email.encode(), when),
            _data(change.message.encode())[:-1],
            b"" if i else b"from refs/heads/main^0\n",
            b"M 100644 inline %s\n" % change.path.encode(),
            _data(change.content),
        ]
    return b"".join(parts)


def fast_import(repo: Path, stream: bytes) -> float:
    begin = time.perf_counter()
    subprocess.run(["git", "-C", str(repo), "fast-import", "--quiet"], input=stream, check=True)
    return time.perf_counter() - begin


def with_mirror(base: Path, mirror_path: Path, made: list[FileChange]) -> tuple[float, str, Mirror]:
    mirror = Mirror(mirror_path, LocalTransport(base), "main", COMMITTER)
    mirror.open()
    mirror.sync()
    begin = time.perf_counter()
    for start in range(0, len(made), BATCH):
        for change in made[start : start + BATCH]:
            mirror.commit(change)
        mirror.save()
    elapsed = time.perf_counter() - begin
    assert mirror.tip is not None
    return elapsed, mirror.tip, mirror


def _tree_with(
    repo: pygit2.Repository, tree: pygit2.Tree, parts: list[str], blob: pygit2.Oid
) -> pygit2.Oid:
    builder = repo.TreeBuilder(tree)
    if len(parts) == 1:
        builder.insert(parts[0], blob, FileMode.BLOB)
    else:
        sub = repo[tree[parts[0]].id].peel(pygit2.Tree)
        builder.insert(parts[0], _tree_with(repo, sub, parts[1:], blob), FileMode.TREE)
    return builder.write()


def with_loose_objects(repo_path: Path, made: list[FileChange]) -> float:
    repo = pygit2.Repository(str(repo_path))
    head = repo.references["refs/heads/main"].target
    begin = time.perf_counter()
    for change in made:
        assert change.content is not None
        when = int(change.time.timestamp())
        tree = _tree_with(
            repo,
            repo[head].peel(pygit2.Tree),
            change.path.split("/"),
            repo.create_blob(change.content),
        )
        head = repo.create_commit(
            None,
            pygit2.Signature(change.author.name, change.author.email, when, 0),
            pygit2.Signature(COMMITTER.name, COMMITTER.email, when, 0),
            change.message,
            tree,
            [head],
        )
    repo.references.create("refs/heads/main", head, force=True)
    return time.perf_counter() - begin


def long_run(commits: int) -> None:
    """Commit, save and push in writer-sized batches; commits/s per tenth of the run."""
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        work = Path(tmp)
        remote = work / "remote.git"
        pygit2.init_repository(str(remote), bare=True, initial_head="main")
        paths = layout(10_000)
        fast_import(remote, base_stream(paths))
        rnd = random.Random(7)
        mirror = Mirror(work / "mirror.git", LocalTransport(remote), "main", COMMITTER)
        mirror.open()
        mirror.sync()
        spent = {"commit": 0.0, "save": 0.0, "push": 0.0}
        tenth = max(BATCH, commits // 10 // BATCH * BATCH)
        window_start, window_made = time.perf_counter(), 0
        print(f"{commits:,} commits, batches of {BATCH}, a push after each")
        for start in range(0, commits, BATCH):
            begin = time.perf_counter()
            for i in range(start, min(commits, start + BATCH)):
                path = rnd.choice(paths)
                mirror.commit(
                    FileChange(
                        path=path,
                        content=content(path, i + 1),
                        message=f"[UPDATE] {path}\n\nAudit-ID: l-{i}\n",
                        author=Identity(name="dev", email="dev@example.com"),
                        time=datetime.fromtimestamp(START + i, UTC),
                    )
                )
            saving = time.perf_counter()
            mirror.save()
            pushing = time.perf_counter()
            mirror.push()
            end = time.perf_counter()
            spent["commit"] += saving - begin
            spent["save"] += pushing - saving
            spent["push"] += end - pushing
            window_made += min(commits, start + BATCH) - start
            if window_made >= tenth or start + BATCH >= commits:
                rate = window_made / (end - window_start)
                print(f"  up to {min(commits, start + BATCH):>9,}: {rate:>7,.0f} commits/s")
                window_start, window_made = end, 0
        packs = len(list((mirror.path / "objects" / "pack").glob("*.pack")))
        total = sum(spent.values())
        shares = ", ".join(f"{name} {100 * s / total:.0f}%" for name, s in spent.items())
        print(f"overall {commits / total:,.0f} commits/s; {packs} packs in the mirror; {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--long-run", type=int, metavar="N", help="see above")
    args = parser.parse_args()
    if args.long_run:
        long_run(args.long_run)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rates: dict[int, tuple[float, float, float]] = {}
    push_line = ""
    versions = f"git {_git_version()}, pygit2 {metadata.version('pygit2')}"
    print(f"{args.commits} single-file commits per run; {versions}")
    print(f"{'files':>8} {'fast-import/s':>14} {'ours/s':>9} {'ours ÷ fi':>10} {'loose/s':>9}")
    for files in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-commits-") as tmp:
            work = Path(tmp)
            paths = layout(files)
            base = work / "base.git"
            pygit2.init_repository(str(base), bare=True, initial_head="main")
            fast_import(base, base_stream(paths))
            made = changes(paths, args.commits)
            stream = commit_stream(made)
            fi_s = ours_s = float("inf")
            for run in range(RUNS):  # each on a fresh copy; the best run counts
                copy = work / f"fi-{run}.git"
                shutil.copytree(base, copy)
                fi_s = min(fi_s, fast_import(copy, stream))
                ours = with_mirror(base, work / f"mirror-{run}.git", made)
                ours_s = min(ours_s, ours[0])
            _, tip, mirror = ours
            shutil.copytree(base, work / "loose.git")
            loose_s = with_loose_objects(work / "loose.git", made)
            fi_tip = subprocess.run(
                ["git", "-C", str(copy), "rev-parse", "main"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if fi_tip != tip:
                sys.exit(f"history differs from fast-import's: {tip} != {fi_tip}")
            n = args.commits
            rates[files] = (n / fi_s, n / ours_s, n / loose_s)
            print(
                f"{files:>8,} {n / fi_s:>14,.0f} {n / ours_s:>9,.0f} "
                f"{fi_s / ours_s:>9.2f}× {n / loose_s:>9,.0f}"
            )
            if files == sizes[-1]:
                begin = time.perf_counter()
                mirror.push()
                push_s = time.perf_counter() - begin
                push_line = (
                    f"push of the {n} commits to a bare repository at {files:,} files: "
                    f"{push_s:.2f} s ({n / push_s:,.0f} commits/s)"
                )
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        names = ("fast-import", "ours", "loose")
        costs = ", ".join(
            f"{name} {rates[small][i] / rates[large][i]:.2f}×" for i, name in enumerate(names)
        )
        print(f"cost per commit at {large:,} files vs {small:,}: {costs}")
    print(push_line)


def _git_version() -> str:
    return subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.split()[-1]


if __name__ == "__main__":
    main()
