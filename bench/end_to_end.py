"""From the apiserver's POST to the remote: how fast do kept writes become pushed commits?

A real ``audit-reverser serve`` takes N ConfigMap creates, every one a kept write, posted as
the kube-apiserver posts them (one sender, 400-event EventLists, back to back, honouring 429);
the clock stops when the remote branch holds every one of the N commits. The reference, in
the same run, is ``git fast-import`` making the same commits (same paths, contents, authors,
dates and messages: the stream is read back from our remote) with a ``checkpoint`` and a
``git push`` every 1,024 commits; its tip must be our tip, so the history is byte-identical,
and ``git fsck --strict`` must find nothing wrong in our remote.

Cases: ``spread`` (200 folders), ``flat`` (one folder), ``100k`` (a remote that already holds
100,000 files in 1,000 folders; the writes go to 100 of them), ``ssh`` (spread, pushed
over SSH to sshd on 127.0.0.1, the reference pushing there too) and ``https`` (spread, pushed
to ``git http-backend`` behind TLS and basic authentication on 127.0.0.1, tests/gitservers.py's
server in a process of its own; the reference too). Each prints writes/s, the ratio to the
reference, what the sender saw acknowledged, the drain time (last answer to last commit in the
remote), serve's peak RSS, and the CPU time per write of serve (all its threads and the ``ssh``
client it runs for a push) and of the reference's git processes (``git push`` with its
``ssh``); over SSH and HTTPS neither counts the remote's ``receive-pack``, which runs under the
server. On a machine shared with other jobs the CPU ratio moves far less than the wall-clock
one.

``serve`` and the reference's git processes run on CPU 0, the sender on CPU 1. serve pushes
with the default ``maxCommits`` (20: in a drain, after every batch the writer takes) and a
1 s interval, so that the last commits do not wait for the default minute.

    python bench/end_to_end.py [--writes 10000] [--cases spread,flat,100k,ssh,https] [--no-fsck]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pygit2
from traced_serve import start_serve  # bench/, the script's own folder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH = 400  # events per EventList, the apiserver's webhook batch
REFERENCE_PUSH_EVERY = 1024
TARGET = "live"


def _pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


# -- the events ------------------------------------------------------------------------------


def _create(i: int, namespace: str, name: str) -> dict[str, Any]:
    stamp = f"2026-11-30T10:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}000Z"
    return {
        "level": "RequestResponse",
        "auditID": f"e2e-{i:08d}-0000-4000-8000-000000000000",
        "stage": "ResponseComplete",
        "requestURI": f"/api/v1/namespaces/{namespace}/configmaps",
        "verb": "create",
        "user": {"username": f"dev-{i % 7}@example.com", "groups": ["system:authenticated"]},
        "sourceIPs": ["10.0.0.7"],
        "userAgent": "kubectl/v1.31.0 (linux/amd64) kubernetes/abc1234",
        "objectRef": {"resource": "configmaps", "namespace": namespace, "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 201},
        "responseObject": {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"00000000-0000-4000-8000-{i:012d}",
                "resourceVersion": str(100000 + i),
                "creationTimestamp": stamp[:19] + "Z",
                "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "shop"},
            },
            "data": {"version": str(i), "settings.yaml": f"replicas: {i % 7}\ntimeout: 30s\n"},
        },
        "requestReceivedTimestamp": stamp,
        "stageTimestamp": stamp,
    }


def _bodies(
    writes: int, folders: list[str], first: int = 0, paths: dict[str, str] | None = None
) -> list[bytes]:
    """EventLists of ``BATCH`` creates, names spread over ``folders`` (namespaces); the file
    each makes goes into ``paths``, by Audit-ID."""
    items = [
        _create(first + i, folders[i % len(folders)], f"cm-{first + i:07d}") for i in range(writes)
    ]
    if paths is not None:
        for item in items:
            ref = item["responseObject"]["metadata"]
            paths[item["auditID"]] = f"{TARGET}/v1/configmaps/{ref['namespace']}/{ref['name']}.yaml"
    return [
        orjson.dumps(
            {
                "kind": "EventList",
                "apiVersion": "audit.k8s.io/v1",
                "metadata": {},
                "items": items[start : start + BATCH],
            }
        )
        for start in range(0, len(items), BATCH)
    ]


async def _post_all(port: int, bodies: list[bytes]) -> float:
    """Post back to back on one connection, as the apiserver does; returns the time of the
    last answer. A 429 or 503 is retried after its Retry-After."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /audit-webhook HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        "Content-Length: {}\r\n\r\n"
    )
    for body in bodies:
        while True:
            writer.write(head.format(len(body)).encode() + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", answer)
            await reader.readexactly(int(length.group(1)) if length else 0)
            if answer.startswith(b"HTTP/1.1 200"):
                break
            if not answer.startswith((b"HTTP/1.1 429", b"HTTP/1.1 503")):
                raise SystemExit(f"serve answered {answer.splitlines()[0]!r}")
            wait = re.search(rb"(?i)retry-after: (\d+)", answer)
            await asyncio.sleep(float(wait.group(1)) if wait else 1.0)
    writer.close()
    return time.perf_counter()


# -- serve -----------------------------------------------------------------------------------


def _config(root: Path, url: str, secret: dict[str, str] | None) -> Path:
    secret_ref = "\n  secretRef: {name: git-creds}" if secret else ""
    documents = ""
    if secret:
        data = "".join(f"  {k}: {orjson.dumps(v).decode()}\n" for k, v in secret.items())
        documents = (
            "---\napiVersion: v1\nkind: Secret\nmetadata: {name: git-creds, namespace: bench}\n"
            f"stringData:\n{data}"
        )
    config = root / "config.yaml"
    config.write_text(f"""\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: bench}}
spec:
  url: {url}
  allowedBranches: ["main"]{secret_ref}
  push: {{interval: "1s", maxCommits: 20}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: live, namespace: bench}}
spec: {{providerRef: {{name: origin}}, branch: main, path: {TARGET}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: all}}
spec:
  targetRef: {{name: live, namespace: bench}}
  rules: [{{scope: Namespaced, resources: ["*"]}}]
{documents}""")
    return config


def _start_serve(root: Path, config: Path) -> tuple[subprocess.Popen[bytes], int]:
    server, port = start_serve(root, config, timeout_s=60)
    _pin(server.pid, 0)
    return server, port


def _cpu_s(pid: int) -> float:
    """CPU seconds ``pid`` has used: all its threads and the children it has waited for (the
    ``ssh`` client of a push, as the reference's count has git push's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(field) for field in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _commits(remote: Path) -> int:
    try:
        return len(list(pygit2.Repository(str(remote)).walk(_tip(remote))))
    except (KeyError, ValueError, pygit2.GitError):
        return 0


def _tip(remote: Path) -> pygit2.Oid:
    target = pygit2.Repository(str(remote)).references["refs/heads/main"].target
    assert isinstance(target, pygit2.Oid)  # a branch, not a symbolic reference
    return target


def _wait_for(remote: Path, commits: int, timeout: float) -> float:
    """Poll the remote until its branch holds ``commits`` commits; the time it did."""
    deadline = time.perf_counter() + timeout
    seen = None
    while time.perf_counter() < deadline:
        try:
            tip = _tip(remote)
        except (KeyError, pygit2.GitError):
            tip = None
        if tip is not None and tip != seen:
            seen = tip
            if _commits(remote) >= commits:
                return time.perf_counter()
        time.sleep(0.05)
    raise SystemExit(f"the remote did not reach {commits} commits in {timeout:.0f} s")


# -- the reference ---------------------------------------------------------------------------


def _data(payload: bytes) -> bytes:
    return b"data %d\n%s\n" % (len(payload), payload)


def _stream(remote: Path, since: pygit2.Oid, paths: dict[str, str]) -> list[bytes]:
    """fast-import commands remaking each commit after ``since`` on the remote's branch:
    the same file, author and committer lines and message. Each commit created one file, the
    one ``paths`` gives for its Audit-ID (diffing trees of a big folder would take longer
    than the whole run)."""
    repo = pygit2.Repository(str(remote))
    tip = repo[_tip(remote)].peel(pygit2.Commit)
    walker = repo.walk(tip.id, pygit2.enums.SortMode.TOPOLOGICAL | pygit2.enums.SortMode.REVERSE)
    walker.hide(since)
    commands = []
    folders: dict[str, pygit2.Tree] = {}
    for n, commit in enumerate(walker):
        header, _, message = repo.odb.read(commit.id)[1].partition(b"\n\n")
        people = [
            line for line in header.split(b"\n") if line.startswith((b"author ", b"committer "))
        ]
        found = re.search(rb"Audit-ID: (\S+)", message)
        if found is None:
            raise SystemExit(f"commit {commit.id} has no Audit-ID")
        path = paths[found.group(1).decode()]
        commands.append(
            b"".join(
                [
                    b"commit refs/heads/main\n",
                    *(line + b"\n" for line in people),
                    _data(message),  # the data's length is exact; the newline after is optional
                    b"" if n else b"from refs/heads/main^0\n",
                    b"M 100644 inline %s\n" % path.encode(),
                    _data(_blob(repo, tip.tree, folders, path)),
                ]
            )
        )
    return commands


def _blob(
    repo: pygit2.Repository, root: pygit2.Tree, folders: dict[str, pygit2.Tree], path: str
) -> bytes:
    """The content of ``path``, each folder's tree read once (libgit2 would parse a folder
    of 40,000 files again for every lookup by path)."""
    folder, _, name = path.rpartition("/")
    if folder not in folders:
        folders[folder] = root[folder].peel(pygit2.Tree)
    return bytes(repo[folders[folder][name].id].peel(pygit2.Blob).data)


def reference(
    base: Path | None, commands: list[bytes], push_url: str, work: Path, env: dict[str, str]
) -> tuple[float, str]:
    """fast-import the commits with a checkpoint and a push every 1,024; (seconds, tip)."""
    repo = work / "reference.git"
    if base is not None:
        shutil.copytree(base, repo)
    else:
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(repo)], check=True)
    begin = time.perf_counter()
    importer = subprocess.Popen(
        ["git", "-C", str(repo), "fast-import", "--quiet", "--done"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    _pin(importer.pid, 0)
    assert importer.stdin is not None and importer.stdout is not None
    for start in range(0, len(commands), REFERENCE_PUSH_EVERY):
        chunk = commands[start : start + REFERENCE_PUSH_EVERY]
        importer.stdin.write(b"".join(chunk) + b"checkpoint\nprogress pushed\n")
        importer.stdin.flush()
        importer.stdout.readline()  # the checkpoint is written when the progress line comes
        push = subprocess.Popen(["git", "-C", str(repo), "push", "-q", push_url, "main"], env=env)
        _pin(push.pid, 0)
        if push.wait() != 0:
            raise SystemExit("the reference's git push failed")
    importer.stdin.write(b"done\n")
    importer.stdin.close()
    importer.wait()
    elapsed = time.perf_counter() - begin
    tip = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "main"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return elapsed, tip


# -- cases -----------------------------------------------------------------------------------


def _base_repository(path: Path, files: int, folders: list[str]) -> None:
    """A bare repository whose one commit holds ``files`` files in ``folders``."""
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
    parts = [
        b"commit refs/heads/main\ncommitter base <base@example.com> 1767225600 +0000\n",
        _data(b"base\n"),
    ]
    per = files // len(folders)
    for n, folder in enumerate(folders):
        for k in range(per):
            name = f"base-{k:04d}"
            parts.append(
                b"M 100644 inline %s/v1/configmaps/%s/%s.yaml\n"
                % (TARGET.encode(), folder.encode(), name.encode())
            )
            parts.append(
                _data(
                    f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"
                    f"  namespace: {folder}\ndata:\n  n: '{n}'\n".encode()
                )
            )
    subprocess.run(
        ["git", "-C", str(path), "fast-import", "--quiet"], input=b"".join(parts), check=True
    )


def _https_server(work: Path) -> tuple[Any, Callable[[], None], Path]:
    """tests/gitservers.py's ``git http-backend`` behind TLS (a CA made on the spot) and
    basic authentication, serving the repositories under ``work``; (server, how to stop it,
    the CA's certificate). It runs in a process of its own, as sshd does, so that the CPU of
    its http-backend runs stays out of this process's children's CPU (the reference's)."""
    import multiprocessing
    import ssl

    from tests.gitservers import GitHttpServer, wait_for_port
    from tests.pki import Authority

    authority = Authority(work, "bench-ca")
    issued = authority.issue("127.0.0.1", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    server = GitHttpServer(work, username="bot", password="bench-token", tls=context)
    process = multiprocessing.get_context("fork").Process(
        target=_serve_forever, args=(server,), daemon=True
    )
    process.start()
    wait_for_port(server.port)

    def stop() -> None:
        process.terminate()
        process.join(10)

    return server, stop, authority.cert


def _serve_forever(server: Any) -> None:
    server.start()
    threading.Event().wait()


def run_case(case: str, writes: int, work: Path, *, fsck: bool) -> dict[str, float]:
    remote = work / "remote.git"
    url, secret, env = f"file://{remote}", None, dict(os.environ)
    push_url: Callable[[Path], str] = str  # the reference's URL for a repository
    stop: Callable[[], None] | None = None
    folders = [f"team-{n:03d}" for n in range(200)]
    base = None
    if case == "flat":
        folders = ["one-folder"]
    if case == "100k":
        every = [f"team-{n:04d}" for n in range(1000)]
        base = work / "base.git"
        _base_repository(base, 100_000, every)
        folders = every[::10]
    if base is not None:
        shutil.copytree(base, remote)
    else:
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    if case == "ssh":
        from tests.gitservers import SshServer

        sshd = SshServer(work / "sshd")
        sshd.start()
        stop = sshd.stop
        url, push_url = sshd.url(remote), sshd.url
        secret = {"ssh-privatekey": sshd.client_key.private, "known_hosts": sshd.known_hosts}
        key = work / "client_key"
        key.write_text(sshd.client_key.private)
        key.chmod(0o600)
        (work / "known_hosts").write_text(sshd.known_hosts)
        env["GIT_SSH_COMMAND"] = (
            f"ssh -i {key} -o UserKnownHostsFile={work / 'known_hosts'} -o IdentitiesOnly=yes"
        )
    if case == "https":
        http, stop, ca = _https_server(work)
        url = http.url(remote)
        secret = {"username": "bot", "password": "bench-token", "ca.crt": ca.read_text()}
        # The reference's git takes the same credentials from its URL and trusts the same CA.
        push_url = lambda repository: http.url(repository).replace(  # noqa: E731
            "https://", "https://bot:bench-token@", 1
        )
        env["GIT_SSL_CAINFO"] = str(ca)
    try:
        before = _commits(remote)
        server, port = _start_serve(work, _config(work, url, secret))
        try:
            # One warm-up write: serve has fetched the remote and pushed once before the clock.
            asyncio.run(_post_all(port, _bodies(1, ["warm-up"], first=10_000_000)))
            _wait_for(remote, before + 1, 120)
            start_tip = _tip(remote)
            # The reference starts where we start: a copy of the remote as it is now.
            shutil.copytree(remote, work / "reference-base.git")
            shutil.copytree(remote, work / "reference-remote.git")
            start_count = _commits(remote)
            paths: dict[str, str] = {}
            bodies = _bodies(writes, folders, paths=paths)
            begin = time.perf_counter()
            cpu_before = _cpu_s(server.pid)
            acknowledged = asyncio.run(_post_all(port, bodies))
            done = _wait_for(remote, start_count + writes, 3600)
            cpu = _cpu_s(server.pid) - cpu_before
            rss = _peak_rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=120)
        commands = _stream(remote, start_tip, paths)
        ours_tip = str(_tip(remote))
        reference_base, reference_remote = (
            work / "reference-base.git",
            work / "reference-remote.git",
        )
        ref_cpu_before = _children_cpu_s()
        ref_s, ref_tip = reference(reference_base, commands, push_url(reference_remote), work, env)
        ref_cpu = _children_cpu_s() - ref_cpu_before
        if ref_tip != ours_tip:
            raise SystemExit(f"{case}: history differs from fast-import's: {ours_tip} != {ref_tip}")
        if (
            fsck
            and subprocess.run(
                ["git", "-C", str(remote), "fsck", "--strict", "--no-dangling", "--no-progress"],
                capture_output=True,
            ).returncode
        ):
            raise SystemExit(f"{case}: git fsck found problems in the remote")
    finally:
        if stop is not None:
            stop()
    ours_s = done - begin
    return {
        "writes/s": writes / ours_s,
        "reference/s": writes / ref_s,
        "ratio": ref_s / ours_s,
        "acknowledged/s": writes / (acknowledged - begin),
        "drain_s": done - acknowledged,
        "rss_mib": rss,
        "cpu_us": cpu / writes * 1e6,
        "ref_cpu_us": ref_cpu / writes * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=10_000)
    parser.add_argument("--cases", default="spread,flat,100k,ssh")
    parser.add_argument(
        "--no-fsck",
        action="store_true",
        help="skip git fsck of our remote (for 40,000 files in one folder it checks 80 GB of "
        "trees and takes longer than the run)",
    )
    args = parser.parse_args()
    _pin(0, 1)
    print(f"{args.writes:,} kept writes per case, {BATCH}-event EventLists; {os.cpu_count()} CPUs")
    print(
        f"{'case':<8} {'ours/s':>8} {'fast-import+push/s':>19} {'ratio':>7} {'acked/s':>9} "
        f"{'drain s':>8} {'peak RSS':>9} {'CPU µs/write ours':>17} {'ref':>5} {'ratio':>6}",
        flush=True,
    )
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-e2e-{case}-") as tmp:
            r = run_case(case, args.writes, Path(tmp), fsck=not args.no_fsck)
        print(
            f"{case:<8} {r['writes/s']:>8,.0f} {r['reference/s']:>19,.0f} {r['ratio']:>6.2f}× "
            f"{r['acknowledged/s']:>9,.0f} {r['drain_s']:>8.1f} {r['rss_mib']:>6.0f} MiB "
            f"{r['cpu_us']:>17,.0f} {r['ref_cpu_us']:>5,.0f} "
            f"{r['ref_cpu_us'] / r['cpu_us']:>5.2f}×",
            flush=True,
        )


if __name__ == "__main__":
    main()
