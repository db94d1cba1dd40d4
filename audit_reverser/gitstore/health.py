"""Can we write to a remote branch? Reachable, authenticated, branch present, push allowed.

The probe talks to the server as a push would, without sending anything: it lists the
remote's branches (fetch side) and then opens the push side (``git-receive-pack``), where
hosts refuse read-only deploy keys and tokens. The result reads like a Kubernetes ``Ready``
condition: a CamelCase reason and a message, so the GitProvider status can carry it as is.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pygit2

from audit_reverser.gitstore.transport import Callbacks, LocalTransport, Transport

_PUSH = 1  # GIT_DIRECTION_PUSH; pygit2 has no name for it


@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    name: str  # reachable, authenticated, branch, push
    ok: bool
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteHealth:
    remote: str
    branch: str
    checks: tuple[Check, ...]
    reason: str  # "Ready" or why not, CamelCase as in status conditions

    @property
    def ready(self) -> bool:
        return self.reason == "Ready"

    @property
    def message(self) -> str:
        failed = [c for c in self.checks if not c.ok]
        if failed:
            return f"{failed[0].name}: {failed[0].detail}"
        return f"branch {self.branch} of {self.remote} can be pushed"


def _failure(callbacks: Callbacks, error: Exception) -> tuple[str, str]:
    """The check that failed and the condition reason, from what the callbacks saw."""
    if callbacks.untrusted_host is not None or isinstance(error, pygit2.CertificateError):
        return "reachable", "HostKeyNotTrusted"
    if callbacks.refused:
        return "authenticated", "AuthenticationFailed"
    return "reachable", "Unreachable"


def probe(transport: Transport, branch: str) -> RemoteHealth:
    """Check ``branch`` of the remote behind ``transport``; blocking (network)."""
    if isinstance(transport, LocalTransport):
        return _probe_local(transport, branch)
    with tempfile.TemporaryDirectory(prefix="audit-reverser-check-") as scratch:
        repo = pygit2.init_repository(scratch, bare=True)
        try:
            return _probe_network(repo, transport, branch)
        finally:
            repo.free()  # before its folder goes (see _probe_local)


def _probe_network(repo: pygit2.Repository, transport: Transport, branch: str) -> RemoteHealth:
    """:func:`probe` over the network; ``repo`` is a scratch repository for libgit2."""
    checks: list[Check] = []
    remote = repo.remotes.create_anonymous(transport.url)
    callbacks = transport.callbacks()
    try:
        heads = remote.list_heads(callbacks=callbacks)
    except pygit2.GitError as exc:
        name, reason = _failure(callbacks, exc)
        if name == "authenticated":
            checks.append(Check(name="reachable", ok=True, detail="the server answered"))
        checks.append(Check(name=name, ok=False, detail=callbacks.explain(exc)))
        return RemoteHealth(
            remote=transport.display, branch=branch, checks=tuple(checks), reason=reason
        )
    checks.append(Check(name="reachable", ok=True, detail="the server answered"))
    credential = getattr(transport, "credential", None)
    checks.append(
        Check(
            name="authenticated",
            ok=True,
            detail=f"with {credential.source}" if credential else "no credentials needed",
        )
    )
    checks.append(_branch_check(branch, [head.name or "" for head in heads]))
    callbacks = transport.callbacks()
    try:
        remote.connect(callbacks=callbacks, direction=_PUSH)
    except pygit2.GitError as exc:
        detail = callbacks.explain(exc)
        checks.append(Check(name="push", ok=False, detail=detail))
        return RemoteHealth(
            remote=transport.display, branch=branch, checks=tuple(checks), reason="PushDenied"
        )
    checks.append(Check(name="push", ok=True, detail="git-receive-pack accepted us"))
    return RemoteHealth(
        remote=transport.display, branch=branch, checks=tuple(checks), reason="Ready"
    )


def _branch_check(branch: str, heads: list[str]) -> Check:
    if f"refs/heads/{branch}" in heads:
        return Check(name="branch", ok=True, detail=f"{branch} exists on the remote")
    return Check(name="branch", ok=True, detail=f"{branch} is new: the first push creates it")


def _probe_local(transport: LocalTransport, branch: str) -> RemoteHealth:
    path = transport.path
    display = transport.display
    try:
        repo = pygit2.Repository(str(path))
    except pygit2.GitError:
        check = Check(name="reachable", ok=False, detail=f"{display} is not a Git repository")
        return RemoteHealth(remote=display, branch=branch, checks=(check,), reason="Unreachable")
    try:
        heads, git_dir = list(repo.references), Path(repo.path)
    finally:
        # pygit2's Repository is in a reference cycle: without this, libgit2's handle on
        # the remote would live until the cycle collector's next pass.
        repo.free()
    checks = [
        Check(name="reachable", ok=True, detail="a local repository"),
        Check(name="authenticated", ok=True, detail="file permissions only"),
        _branch_check(branch, heads),
    ]
    writable = all(os.access(git_dir / part, os.W_OK) for part in ("objects", "refs"))
    if not writable:
        checks.append(Check(name="push", ok=False, detail=f"{display} is not writable for us"))
        return RemoteHealth(
            remote=display, branch=branch, checks=tuple(checks), reason="PushDenied"
        )
    checks.append(Check(name="push", ok=True, detail="objects and refs are writable"))
    return RemoteHealth(remote=display, branch=branch, checks=tuple(checks), reason="Ready")
