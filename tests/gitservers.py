"""Real Git servers on 127.0.0.1 for the remote tests: OpenSSH's sshd and git http-backend.

Both serve the bare repositories under one folder, the way GitHub or Gitea serve theirs:
sshd runs git-receive-pack / git-upload-pack for a deploy key in ``authorized_keys``; the HTTP
server runs the ``git http-backend`` CGI program behind basic authentication. Each can be
stopped and started again on the same port, to play a remote that goes away and comes back.
"""

from __future__ import annotations

import base64
import getpass
import hmac
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HTTP_BACKEND = Path("/usr/lib/git-core/git-http-backend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class KeyPair:
    """An Ed25519 key in OpenSSH's formats."""

    def __init__(self, passphrase: str | None = None) -> None:
        if passphrase:
            # OpenSSH's encrypted key format needs bcrypt, which cryptography leaves to an
            # extra package; ssh-keygen (beside sshd) writes it.
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "key"
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)],
                    check=True,
                )
                self.private = path.read_text()
                self.public = path.with_suffix(".pub").read_text().strip()
            return
        key = ed25519.Ed25519PrivateKey.generate()
        self.private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode()
        self.public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )


_READ_ONLY = """#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
    git-upload-pack*) exec sh -c "$SSH_ORIGINAL_COMMAND" ;;
    *) echo "ERROR: The key you are authenticating with has been marked as read only." >&2
       exit 1 ;;
esac
"""


class SshServer:
    """``sshd -D`` with its own host key, config and authorized keys in a temp folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = KeyPair()
        self.client_key = KeyPair()
        directory.mkdir(parents=True, exist_ok=True)
        host_key = directory / "host_key"
        host_key.write_text(self.host_key.private)
        host_key.chmod(0o600)
        (directory / "authorized_keys").write_text(self.client_key.public + "\n")
        (directory / "sshd_config").write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
            f"PidFile {directory / 'sshd.pid'}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    def authorize(self, public_key: str, *, read_only: bool = False) -> None:
        """Let ``public_key`` in; a read-only key may fetch but not push, as on GitHub."""
        options = ""
        if read_only:
            wrapper = self.directory / "read-only.sh"
            wrapper.write_text(_READ_ONLY)
            wrapper.chmod(0o755)
            options = f'command="{wrapper}",no-pty '
        with open(self.directory / "authorized_keys", "a") as keys:
            keys.write(f"{options}{public_key}\n")

    @property
    def known_hosts(self) -> str:
        """The line a user gets from ``ssh-keyscan -p PORT 127.0.0.1``."""
        return f"[127.0.0.1]:{self.port} {self.host_key.public}\n"

    def url(self, repo: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{repo}"

    def start(self) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        log = open(self.directory / "sshd.log", "ab")  # noqa: SIM115 - kept by the process
        self._process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.directory / "sshd_config")],
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


class GitHttpServer:
    """``git http-backend`` behind HTTP basic authentication, on a free loopback port."""

    def __init__(
        self, root: Path, username: str | None, password: str, tls: ssl.SSLContext | None = None
    ) -> None:
        # username None: any user name with the right password, as hosts take tokens.
        self.root = root
        self.tls = tls
        self.port = free_port()
        self.username = username
        self.password = password
        self.requests: list[str] = []  # "METHOD path user", what a server log would show
        # Cleared: requests wait, as on a remote that stopped answering, until released.
        self.answering = threading.Event()
        self.answering.set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, repo: Path) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{repo.relative_to(self.root)}"

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self._server.daemon_threads = True
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def authorized(self, header: str | None) -> str | None:
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        right_user = self.username is None or hmac.compare_digest(user, self.username)
        if right_user and hmac.compare_digest(password, self.password):
            return user
        return None


def _handler_for(server: GitHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if not size:
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            server.answering.wait()
            body = self._body()
            user = server.authorized(self.headers.get("Authorization"))
            path, _, query = self.path.partition("?")
            server.requests.append(f"{self.command} {path} {user or '-'}")
            if user is None:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(server.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": user,
                "REMOTE_ADDR": "127.0.0.1",
                "GIT_CONFIG_NOSYSTEM": "1",
            }
            if self.headers.get("Content-Encoding") == "gzip":
                env["HTTP_CONTENT_ENCODING"] = "gzip"
            done = subprocess.run([str(HTTP_BACKEND)], input=body, env=env, capture_output=True)
            head, _, payload = done.stdout.partition(b"\r\n\r\n")
            status, headers = 200, []
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler
