"""Pushing to SSH and HTTPS remotes by sending the packs we already wrote to receive-pack.

libgit2's push over SSH or HTTPS builds a new pack: it walks the new commits, reads every
tree back and searches deltas our batch packs already hold (about 400 µs and 100 MiB of peak
RSS more per write than handing a local remote our packs, :mod:`.localpush`). Git's
receive-pack protocol takes any pack holding what the remote lacks, so the packs written
since the last push (merged into one when there are several) are sent as they are.

Over SSH, OpenSSH's ``ssh`` client carries it, with the security of the libgit2 path: the
host key is checked against the provider's ``known_hosts`` only (``StrictHostKeyChecking``,
no user or system configuration, no agent, no prompt), and the deploy key goes in a file of
its own (0600, in a private folder removed afterwards), never on a command line or in a log.
Over HTTP(S) the same exchange is a GET of ``info/refs`` and a POST to ``git-receive-pack``
(Git's smart HTTP), the credentials sent only once the server asks for them, certificates
checked against the system's authorities and the Secret's ``ca.crt``.

Before the pack is sent the advertised branch must be where we last saw it, else
:class:`RemoteMoved` (someone else pushed: the caller fetches and replays, as after a
rejected push). The update names that old id, so receive-pack refuses it if the branch moves
meanwhile; nothing is ever forced. Anything this code does not handle (no ``ssh`` program, an
encrypted key, a server without ``report-status``, a redirection) raises
:class:`PackPushUnsupported` before anything is sent, and the caller uses libgit2's push.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from audit_reverser.errors import RemoteUnavailable
from audit_reverser.gitstore.localpush import RemoteMoved
from audit_reverser.gitstore.packing import merge_packs
from audit_reverser.gitstore.transport import NetworkTransport, Password, SshKey, scrub

ZERO_ID = b"\0" * 20
# As libgit2's own limits (transport.py): a silent server must not hold the writer forever.
CONNECT_TIMEOUT_S = 15
ALIVE_INTERVAL_S = 15
ALIVE_COUNT = 8
SERVER_TIMEOUT_S = 120
_CHUNK = 1 << 20


class PackPushUnsupported(Exception):
    """This remote or key needs libgit2's push; nothing was sent. The text says why."""


def ssh_key(transport: NetworkTransport) -> SshKey:
    """The deploy key of an SSH remote this module can push to, else PackPushUnsupported."""
    key = transport.credential
    if urlsplit(transport.url).scheme != "ssh" or not isinstance(key, SshKey):
        raise PackPushUnsupported("not an SSH remote with a deploy key")
    if key.passphrase or _encrypted(key.private_key):
        # ssh would ask for the passphrase on a terminal; libgit2 takes it from memory.
        raise PackPushUnsupported("the deploy key is encrypted")
    if shutil.which("ssh") is None:
        raise PackPushUnsupported("no ssh program")
    return key


def push_pack(
    transport: NetworkTransport,
    ref: str,
    old: bytes | None,
    new: bytes,
    packs: list[Path],
    scratch: Path,
) -> None:
    """Move ``ref`` of the remote from ``old`` (None: it must not exist) to ``new``, sending
    the objects of ``packs``; ``scratch`` is a folder for a merged pack (emptied after)."""
    if urlsplit(transport.url).scheme in ("http", "https"):
        with _one_pack(packs, scratch) as pack:
            _push_http(transport, ref, old, new, pack)
        return
    key = ssh_key(transport)
    try:
        folder = tempfile.TemporaryDirectory(prefix="audit-reverser-ssh-")
    except OSError as exc:  # no writable temporary folder (a read-only root, no /tmp volume)
        raise PackPushUnsupported(f"no private temporary folder: {exc}") from exc
    with folder as private:
        command = _ssh_command(transport.url, key, Path(private))
        with _one_pack(packs, scratch) as pack:
            _exchange(command, Path(private), transport, key, ref, old, new, pack)


@contextlib.contextmanager
def _one_pack(packs: list[Path], scratch: Path) -> Iterator[Path]:
    """The one pack holding the objects of ``packs``: itself, or them merged in ``scratch``."""
    if len(packs) == 1:
        yield packs[0]
        return
    try:
        yield merge_packs(packs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _encrypted(private_key: str) -> bool:
    if "ENCRYPTED" in private_key:  # PEM: "Proc-Type: 4,ENCRYPTED" or "ENCRYPTED PRIVATE KEY"
        return True
    lines = private_key.strip().splitlines()
    if not lines or "OPENSSH PRIVATE KEY" not in lines[0]:
        return False
    try:
        blob = base64.b64decode("".join(lines[1:-1]))
    except ValueError:
        return False
    # "openssh-key-v1\0", then the cipher's name as a 32-bit length and the text.
    start = len(b"openssh-key-v1\0")
    size = int.from_bytes(blob[start : start + 4], "big")
    return blob[start + 4 : start + 4 + size] != b"none"


def _ssh_command(url: str, key: SshKey, private: Path) -> list[str]:
    parts = urlsplit(url)
    identity = private / "key"
    fd = os.open(identity, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key.private_key.strip() + "\n")  # ssh refuses a key without its newline
    (private / "known_hosts").write_text(key.known_hosts.strip() + "\n")
    path = unquote(parts.path)
    if path.startswith("/~"):  # ssh://host/~user/repo is relative to a home, as git reads it
        path = path[1:]
    quoted = "'" + path.replace("'", "'\\''") + "'"
    options = {
        "BatchMode": "yes",
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": str(private / "known_hosts"),
        "GlobalKnownHostsFile": "/dev/null",
        "UpdateHostKeys": "no",
        "IdentitiesOnly": "yes",
        "IdentityFile": str(identity),
        "IdentityAgent": "none",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "ClearAllForwardings": "yes",
        "ControlMaster": "no",
        "ControlPath": "none",
        "ConnectTimeout": str(CONNECT_TIMEOUT_S),
        "ServerAliveInterval": str(ALIVE_INTERVAL_S),
        "ServerAliveCountMax": str(ALIVE_COUNT),
        "LogLevel": "ERROR",
    }
    command = ["ssh", "-F", "/dev/null", "-T", "-x"]
    for name, value in options.items():
        command += ["-o", f"{name}={value}"]
    if parts.port:
        command += ["-p", str(parts.port)]
    command += ["-l", unquote(parts.username or "git"), "--", parts.hostname or ""]
    return [*command, f"git-receive-pack {quoted}"]


def _exchange(
    command: list[str],
    private: Path,
    transport: NetworkTransport,
    key: SshKey,
    ref: str,
    old: bytes | None,
    new: bytes,
    pack: Path,
) -> None:
    """Run receive-pack over ssh: read its references, send the update and the pack, read
    its report; any failure is RemoteUnavailable (or RemoteMoved) naming the reason."""
    errors = open(private / "stderr", "w+b")  # noqa: SIM115 - closed below; a file cannot fill up
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            env={k: v for k, v in os.environ.items() if not k.startswith("SSH_")},
        )
    except OSError as exc:
        errors.close()
        raise PackPushUnsupported(f"cannot run ssh: {exc}") from exc
    assert process.stdin is not None and process.stdout is not None
    try:
        try:
            _converse(process.stdin, process.stdout, ref, old, new, pack, transport.display)
        except BaseException as exc:
            process.kill()  # receive-pack drops a connection that ends before its commands
            process.wait()
            if isinstance(exc, OSError | ValueError | EOFError):
                raise RemoteUnavailable(_reason(transport, key, errors, exc)) from None
            raise
        if process.wait() != 0:
            raise RemoteUnavailable(_reason(transport, key, errors, None))
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()
        process.stdout.close()
        errors.close()


def _converse(
    send: IO[bytes],
    answers: IO[bytes],
    ref: str,
    old: bytes | None,
    new: bytes,
    pack: Path,
    where: str,
) -> None:
    _check_advertisement(answers, ref, old, where)
    send.write(_update(ref, old, new))
    with open(pack, "rb") as body:
        while chunk := body.read(_CHUNK):
            send.write(chunk)
    send.flush()
    send.close()
    _check_report(answers, ref, where)


def _check_advertisement(answers: IO[bytes], ref: str, old: bytes | None, where: str) -> None:
    """Read what receive-pack announces; RemoteMoved unless ``ref`` is at ``old``."""
    refs, capabilities = _advertisement(answers, where)
    if "report-status" not in capabilities:
        raise PackPushUnsupported("the server does not report the push's status")
    if any(c.startswith("object-format=") and c != "object-format=sha1" for c in capabilities):
        raise PackPushUnsupported("the repository does not use SHA-1")
    current = refs.get(ref)
    if current != old:
        seen = current.hex()[:12] if current else "nothing"
        raise RemoteMoved(f"{ref} of {where} moved (it is at {seen})")


def _update(ref: str, old: bytes | None, new: bytes) -> bytes:
    """The one command of our push, and the flush that ends the commands."""
    update = f"{(old or ZERO_ID).hex()} {new.hex()} {ref}\0report-status agent=audit-reverser\n"
    return _pkt(update.encode()) + b"0000"


def _check_report(answers: IO[bytes], ref: str, where: str) -> None:
    """Read receive-pack's report: anything but the pack stored and ``ref`` updated fails."""
    status = list(_pkt_lines(answers))
    if not status or status[0] != b"unpack ok":
        reason = status[0].decode(errors="replace") if status else "no status"
        raise RemoteUnavailable(f"push to {where} failed: the remote kept no pack: {reason}")
    if f"ok {ref}".encode() not in status[1:]:
        # "ng <ref> <reason>", worded as libgit2's rejections are
        refused = [line.decode(errors="replace")[3:] for line in status[1:] if line[:3] == b"ng "]
        reason = "; ".join(": ".join(line.split(" ", 1)) for line in refused) or "no status"
        raise RemoteUnavailable(f"push to {where} was rejected: {reason}")


def _advertisement(answers: IO[bytes], where: str) -> tuple[dict[str, bytes], set[str]]:
    """The references and capabilities receive-pack announces."""
    refs: dict[str, bytes] = {}
    capabilities: set[str] = set()
    for line in _pkt_lines(answers):
        if line.startswith(b"ERR "):
            raise RemoteUnavailable(f"push to {where} failed: {line[4:].decode(errors='replace')}")
        if b"\0" in line:
            line, _, announced = line.partition(b"\0")
            capabilities = set(announced.decode(errors="replace").split())
        oid, _, name = line.partition(b" ")
        if name != b"capabilities^{}":  # an empty repository's placeholder
            refs[name.decode(errors="replace")] = bytes.fromhex(oid.decode())
    return refs, capabilities


def _pkt(payload: bytes) -> bytes:
    return b"%04x" % (len(payload) + 4) + payload


def _pkt_lines(answers: IO[bytes]) -> Iterator[bytes]:
    """The pkt-lines up to the next flush, without their trailing newline."""
    while True:
        header = _read_exactly(answers, 4)
        size = int(header, 16)
        if size == 0:
            return
        if size < 4:
            raise ValueError(f"bad pkt-line length {header!r}")
        yield _read_exactly(answers, size - 4).removesuffix(b"\n")


def _read_exactly(answers: IO[bytes], size: int) -> bytes:
    data = answers.read(size)
    if len(data) != size:
        raise EOFError("the connection closed")
    return data


def _reason(
    transport: NetworkTransport, key: SshKey, errors: IO[bytes], exc: Exception | None
) -> str:
    """Why ssh or receive-pack failed, in the words the libgit2 path uses; ssh's own
    messages never hold key material, and the passphrase path is never taken here."""
    errors.seek(0)
    text = errors.read()[-2000:].decode(errors="replace").strip()
    host = urlsplit(transport.url).hostname or "the server"
    if "Host key verification failed" in text or "HOST IDENTIFICATION HAS CHANGED" in text:
        return (
            f"push to {transport.display} failed: host key of {host} is not trusted: it is "
            f"missing from, or differs from, known_hosts in {key.source}"
        )
    if "Permission denied" in text:
        return f"push to {transport.display} failed: authentication failed ({key.source})"
    detail = text.splitlines()[-1] if text else str(exc or "ssh failed")
    return f"push to {transport.display} failed: {key.scrub(detail)}"


# -- HTTP(S): the same exchange as a GET of the references and a POST of update and pack ----

# Some hosts answer Git's smart protocol only to clients that say they are git.
_USER_AGENT = "git/2.0 (audit-reverser)"
_ADVERTISEMENT = "application/x-git-receive-pack-advertisement"


def _push_http(
    transport: NetworkTransport, ref: str, old: bytes | None, new: bytes, pack: Path
) -> None:
    credential = transport.credential
    if credential is not None and not isinstance(credential, Password):
        raise PackPushUnsupported("not a password or token")
    parts = urlsplit(transport.url)
    base = parts.path.rstrip("/")
    where = transport.display
    connection = _connect(parts.scheme, parts.hostname or "", parts.port, transport.authority)
    headers = {"User-Agent": _USER_AGENT}
    try:
        # Anonymous first, as libgit2 asks: the credentials go only where they are asked for.
        answer = _send(connection, "GET", f"{base}/info/refs?service=git-receive-pack", headers)
        if answer.status == 401 and credential is not None:
            answer.read()
            token = f"{credential.username}:{credential.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
            answer = _send(connection, "GET", f"{base}/info/refs?service=git-receive-pack", headers)
        _check_answer(answer, transport)
        if answer.getheader("Content-Type") != _ADVERTISEMENT:
            raise PackPushUnsupported("the server does not speak Git's smart HTTP protocol")
        if list(_pkt_lines(answer)) != [b"# service=git-receive-pack"]:
            raise ValueError("not a receive-pack advertisement")
        _check_advertisement(answer, ref, old, where)
        answer.read()
        update = _update(ref, old, new)
        headers |= {
            "Content-Type": "application/x-git-receive-pack-request",
            "Accept": "application/x-git-receive-pack-result",
            "Content-Length": str(len(update) + pack.stat().st_size),
        }
        answer = _send(connection, "POST", f"{base}/git-receive-pack", headers, _body(update, pack))
        _check_answer(answer, transport)
        _check_report(answer, ref, where)
    except ssl.SSLCertVerificationError:
        source = credential.source if credential else "the GitProvider's Secret"
        raise RemoteUnavailable(
            f"push to {where} failed: certificate of {parts.hostname} is not trusted by the "
            f"system's authorities nor by ca.crt in {source}"
        ) from None
    except (OSError, http.client.HTTPException, ValueError, EOFError) as exc:
        text = credential.scrub(str(exc)) if credential else str(exc)
        raise RemoteUnavailable(f"push to {where} failed: {scrub(text)}") from None
    finally:
        connection.close()


def _connect(
    scheme: str, host: str, port: int | None, authority: str | None
) -> http.client.HTTPConnection:
    if scheme == "http":
        return _HTTPConnection(host, port)
    context = ssl.create_default_context()  # the system's authorities, as libgit2 trusts
    if authority:
        context.load_verify_locations(cadata=authority)
    return _HTTPSConnection(host, port, context=context)


def _within_timeouts(connection: http.client.HTTPConnection, connect: Callable[[], None]) -> None:
    """Connect (and shake hands) within CONNECT_TIMEOUT_S, as libgit2 and ssh do; then give
    each answer SERVER_TIMEOUT_S (the server indexes the pack before it answers)."""
    connection.timeout = CONNECT_TIMEOUT_S
    connect()
    assert connection.sock is not None
    connection.sock.settimeout(SERVER_TIMEOUT_S)


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:  # also when http.client connects again
        _within_timeouts(self, super().connect)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        _within_timeouts(self, super().connect)


def _send(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Iterator[bytes] | None = None,
) -> http.client.HTTPResponse:
    connection.request(method, path, body=body, headers=headers)
    return connection.getresponse()


def _body(update: bytes, pack: Path) -> Iterator[bytes]:
    yield update
    with open(pack, "rb") as body:
        while chunk := body.read(_CHUNK):
            yield chunk


def _check_answer(answer: http.client.HTTPResponse, transport: NetworkTransport) -> None:
    if answer.status == 200:
        return
    answer.read()
    if 300 <= answer.status < 400:  # libgit2 follows a redirection of the first request
        raise PackPushUnsupported(f"the server redirects (HTTP {answer.status})")
    where = transport.display
    if answer.status in (401, 403):
        source = transport.credential.source if transport.credential else "no credentials"
        raise RemoteUnavailable(f"push to {where} failed: authentication failed ({source})")
    raise RemoteUnavailable(f"push to {where} failed: HTTP {answer.status} {answer.reason}")
