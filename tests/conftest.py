"""Shared test kit: real-shaped audit events, real bare remotes, and plain-git readers.

Everything a test asserts on is read back with the ``git`` command line from the bare
remote, as a user would, never through our own Git code.
"""

from __future__ import annotations

import asyncio
import http.client
import inspect
import itertools
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from blockbuster import blockbuster_ctx

from audit_reverser.config import load_config
from audit_reverser.gitstore.types import FileChange, Identity
from audit_reverser.ingest.server import make_app
from audit_reverser.pipeline.resolve import ObjectSource
from audit_reverser.runtime import Runtime, Settings
from tests.gitservers import HTTP_BACKEND, SSHD, GitHttpServer, SshServer
from tests.redisserver import REDIS_SERVER, RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent
# Test data lives in the repository: a user's clone has nothing beside it.
CORPUS = REPO_ROOT / "tests" / "data" / "audit-corpus"
SEED = REPO_ROOT / "tests" / "data" / "seed-crds"

_ids = itertools.count(1)


def configmap(
    name: str = "demo",
    namespace: str = "default",
    data: dict[str, str] | None = None,
    rv: str = "100",
    **metadata: Any,
) -> dict[str, Any]:
    """A ConfigMap as the apiserver returns it, server-owned fields included."""
    return {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "7d1c7c5e-8f1e-4a4b-9a49-2f2c1f0b6a11",
            "resourceVersion": rv,
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "managedFields": [
                {
                    "manager": "kubectl-create",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {},
                }
            ],
            **metadata,
        },
        "data": data if data is not None else {"greeting": "hello"},
    }


def event(
    verb: str = "create",
    *,
    resource: str = "configmaps",
    namespace: str | None = "default",
    name: str | None = "demo",
    group: str = "",
    version: str = "v1",
    subresource: str | None = None,
    body: dict[str, Any] | None = None,
    request: Any = None,
    code: int | None = None,
    stage: str = "ResponseComplete",
    user: str = "alice@example.com",
    groups: Iterable[str] = ("system:authenticated",),
    impersonated: str | None = None,
    audit_id: str | None = None,
    query: str = "",
    time: str = "2026-01-02T03:04:05.123456Z",
    level: str = "RequestResponse",
) -> dict[str, Any]:
    """One webhook EventList item: like the apiserver's, with no kind/apiVersion of its own."""
    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    uri = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{resource}"
    if name and verb not in ("create", "deletecollection"):
        uri += f"/{name}"
    if subresource:
        uri += f"/{subresource}"
    ref: dict[str, Any] = {"resource": resource, "apiVersion": version}
    if group:
        ref["apiGroup"] = group
    if namespace:
        ref["namespace"] = namespace
    if name:
        ref["name"] = name
    if subresource:
        ref["subresource"] = subresource
    item: dict[str, Any] = {
        "level": level,
        "auditID": audit_id or f"00000000-0000-4000-8000-{next(_ids):012d}",
        "stage": stage,
        "requestURI": uri + (f"?{query}" if query else ""),
        "verb": verb,
        "user": {"username": user, "groups": list(groups)},
        "sourceIPs": ["10.0.0.7"],
        "userAgent": "kubectl/v1.31.0 (linux/amd64) kubernetes/abc1234",
        "objectRef": ref,
        "responseStatus": {"metadata": {}, "code": code or (201 if verb == "create" else 200)},
        "requestReceivedTimestamp": time,
        "stageTimestamp": time,
    }
    if impersonated:
        item["impersonatedUser"] = {"username": impersonated, "groups": ["team"]}
    if request is not None:
        item["requestObject"] = request
    if body is not None:
        item["responseObject"] = body
    return item


def event_list(*items: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "EventList",
        "apiVersion": "audit.k8s.io/v1",
        "metadata": {},
        "items": list(items),
    }


# -- git, as a user runs it ------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def git_files(repo: Path, ref: str = "main") -> list[str]:
    try:
        return git(repo, "ls-tree", "-r", "--name-only", ref).split()
    except subprocess.CalledProcessError:
        return []


def git_show(repo: Path, path: str, ref: str = "main") -> str:
    return git(repo, "show", f"{ref}:{path}")


def git_subjects(repo: Path, ref: str = "main") -> list[str]:
    """Commit subjects, oldest first."""
    try:
        return git(repo, "log", "--reverse", "--format=%s", ref).splitlines()
    except subprocess.CalledProcessError:
        return []


WHO = Identity(name="jane", email="jane@example.com")


def file_change(n: int) -> FileChange:
    """A new file ``live/c<n>.yaml``, committed as "[CREATE] c<n>" by jane."""
    return FileChange(
        path=f"live/c{n}.yaml",
        content=f"n: {n}\n".encode(),
        message=f"[CREATE] c{n}\n\nAudit-ID: id-{n}\n",
        author=WHO,
        time=datetime(2026, 11, 30, tzinfo=UTC),
    )


def bare_repo(path: Path) -> Path:
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
    return path


def write_config(
    path: Path,
    remote: Path,
    *,
    target_path: str = "live",
    max_commits: int = 1000,
    interval: str = "1h",
    url: str | None = None,
    secret: dict[str, str] | None = None,
    encryption: str = "",
    documents: str = "",
) -> Path:
    """A config writing everything to ``remote`` (or ``url``, with ``secret`` as the
    provider's credentials Secret); ``encryption`` is YAML added to the target's spec
    (indented by two), ``documents`` more YAML documents at the end."""
    secret_ref = "\n  secretRef: {name: git-creds}" if secret is not None else ""
    secret_doc = ""
    if secret is not None:
        secret_doc = yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "git-creds", "namespace": "team"},
                "stringData": secret,
            }
        )
        secret_doc = f"---\n{secret_doc}"
    path.write_text(f"""\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: team}}
spec:
  url: {url or f"file://{remote}"}
  allowedBranches: ["main"]{secret_ref}
  push: {{interval: "{interval}", maxCommits: {max_commits}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: live, namespace: team}}
spec:
  providerRef: {{name: origin}}
  branch: main
  path: {target_path}{encryption}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: all}}
spec:
  targetRef: {{name: live, namespace: team}}
  rules:
    - scope: Namespaced
      resources: ["*"]
    - scope: Cluster
      resources: ["*"]
{secret_doc}{documents}""")
    return path


# -- a real `audit-reverser serve` process ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One request on a fresh connection to a local server (HTTPS with ``context``);
    returns the status and the body."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Served:
    """A running ``audit-reverser serve``; its log goes to a file, so that a chatty server
    can never block on a full pipe that nobody reads."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> str:
        """SIGTERM, as Kubernetes stops a pod; returns everything it logged."""
        self.process.terminate()
        self.process.wait(timeout=300)  # a bound against hangs, not a time to meet
        return self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        self.process.kill()
        self.process.wait(timeout=60)


def start_serve(cwd: Path, *args: str, port: int | None = None, ca: Path | None = None) -> Served:
    """``audit-reverser serve ARGS`` on a free loopback port, once it answers /readyz (over
    HTTPS, trusting ``ca``, when given)."""
    port = port or free_port()
    scheme, context = "http", None
    if ca is not None:
        scheme, context = "https", ssl.create_default_context(cafile=ca)
    log = cwd / f"serve-{port}.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "audit_reverser",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                *args,
            ],
            cwd=cwd,
            stderr=sink,
        )
    served = Served(process, port, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{port}/readyz", timeout=1, context=context
            )
            return served
        except OSError:
            if process.poll() is not None:
                raise AssertionError(log.read_text()) from None
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.05)


def require(program: Path | str, package: str) -> None:
    """Skip on a developer machine without ``program``; in CI (``CI`` set) fail instead, so
    that a missing package can never turn these tests into silent skips."""
    if Path(program).exists():
        return
    message = f"{program} is missing: apt-get install {package}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


async def eventually(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Wait until ``condition`` (polled: what a user would look at, the remote's or the
    writer's state, changes in other threads) holds; bounded, so that a bug cannot hang CI."""
    async with asyncio.timeout(10):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(0.02)


class Harness:
    """A running pipeline writing to a real bare remote, fed like the webhook feeds it."""

    def __init__(self, runtime: Runtime, remote: Path) -> None:
        self.runtime = runtime
        self.remote = remote

    async def send(self, *items: dict[str, Any]) -> None:
        triage = self.runtime.intake.triage(items)
        await self.runtime.intake.accept(triage)

    async def sync(self) -> None:
        """Commit and push everything sent so far."""
        assert await self.runtime.flush() == []

    async def files(self) -> list[str]:
        return await asyncio.to_thread(git_files, self.remote)

    async def show(self, path: str) -> str:
        return await asyncio.to_thread(git_show, self.remote, path)

    async def subjects(self) -> list[str]:
        return await asyncio.to_thread(git_subjects, self.remote)

    async def log(self, fmt: str) -> list[str]:
        out = await asyncio.to_thread(
            git, self.remote, "log", "--reverse", f"--format={fmt}", "-z", "main"
        )
        return [entry for entry in out.split("\0") if entry]


async def start_harness(
    tmp_path: Path,
    settings: dict[str, Any] | None = None,
    source: ObjectSource | None = None,
    **options: Any,
) -> Harness:
    """A started pipeline on a bare remote (made when missing); ``options`` go to the config,
    ``settings`` to the runtime, ``source`` reads objects events lack. The set-up runs off
    the event loop."""

    def prepare() -> Harness:
        remote = tmp_path / "remote.git"
        if not remote.exists():
            bare_repo(remote)
        config = load_config([write_config(tmp_path / "config.yaml", remote, **options)])
        state = Settings(state_dir=tmp_path / "state", **(settings or {}))
        runtime = Runtime(config, state, source=source)
        return Harness(runtime, remote)

    harness = await asyncio.to_thread(prepare)
    await harness.runtime.start()
    return harness


class _Borrowed:
    """The harness's runtime as the app's receiver; the harness owns its start and close."""

    def __init__(self, harness: Harness) -> None:
        self.intake = harness.runtime.intake
        self._runtime = harness.runtime

    def ready(self) -> bool:
        return self._runtime.ready()

    def readiness(self) -> list[tuple[str, bool | None, str]]:
        return self._runtime.readiness()

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def http_client(harness: Harness, **app_options: Any) -> TestClient[web.Request, web.Application]:
    """An HTTP client for the receiver app over the harness's pipeline (real sockets)."""
    return TestClient(TestServer(make_app(_Borrowed(harness), **app_options)))


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    started = await start_harness(tmp_path)
    yield started
    await started.runtime.close()


@pytest.fixture(autouse=True)
def loop_never_blocks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Async tests fail when anything blocks the event loop (file I/O, sleeps, sockets)."""
    if not asyncio.iscoroutinefunction(request.function):
        yield
        return
    with blockbuster_ctx():
        yield


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A real OpenSSH server on 127.0.0.1 that knows one deploy key."""
    require(SSHD, "openssh-server")
    server = SshServer(tmp_path / "sshd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def git_http(tmp_path: Path) -> Iterator[GitHttpServer]:
    """``git http-backend`` over HTTP basic auth, serving the repositories under tmp_path."""
    require(HTTP_BACKEND, "git")
    server = GitHttpServer(tmp_path, username="bot", password="s3cr3t-t0ken-9f8e7d")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 with a password and its AOF fsynced on every write."""
    require(REDIS_SERVER, "redis-server")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
