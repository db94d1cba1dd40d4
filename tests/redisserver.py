"""A real ``redis-server`` on 127.0.0.1 for the shared-journal tests, as production runs it:
append-only file fsynced on every write, a password. It can be killed (SIGKILL, no chance to
save anything more) and started again on the same port and folder, to play a Redis restart.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.gitservers import free_port, wait_for_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(
        self, directory: Path, *, appendonly: str = "yes", appendfsync: str = "always"
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        directory.mkdir(parents=True, exist_ok=True)
        self.password_file = directory / "password"
        self.password_file.write_text(self.password + "\n")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - kept by the process
        self._process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                self.appendonly,
                "--appendfsync",
                self.appendfsync,
                # The AOF is the record; no background RDB snapshots beside it.
                "--save",
                "",
                "--requirepass",
                self.password,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_for_port(self.port)
        self._wait_until_loaded()

    def _wait_until_loaded(self, timeout: float = 10.0) -> None:
        """Redis listens before it has read its AOF back and answers -LOADING until then."""
        deadline = time.monotonic() + timeout
        command = f"AUTH {self.password}\r\nPING\r\n".encode()
        while True:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
                connection.sendall(command)
                answer = b""
                while answer.count(b"\r\n") < 2:
                    answer += connection.recv(256)
            if answer.endswith(b"+PONG\r\n"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not become ready: {answer!r}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: whatever Redis had not fsynced is lost, as in a node failure."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)
            self._process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def command(self, *args: str) -> str:
        """One command through ``redis-cli`` (the password in its environment, not argv):
        what an operator would see."""
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), "--no-raw", *args],
            env={"REDISCLI_AUTH": self.password, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout.strip().removeprefix("(integer) ")
