"""Where the shared journal lives and how to reach it: ``redis://HOST:PORT[/DB]`` or
``rediss://`` (TLS), a password read from a file, and how many Redis replicas must hold a
write before it counts as durable.

:func:`connect` fails with one clear line for a wrong password, a server we cannot reach, or
a server that would acknowledge writes it has not fsynced; later, :meth:`Connection.durable`
is what every write waits for before anyone answers 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from audit_reverser.errors import ConfigError, PermanentError, TemporaryError

log = logging.getLogger(__name__)

DEFAULT_PORT = 6379
DEFAULT_TIMEOUT_S = 5.0
# WAITAOF (wait for the AOF fsync, locally and on replicas) exists from Redis 7.2; Valkey
# reports redis_version 7.2.4 for compatibility, so one comparison covers both.
WAITAOF_SINCE = (7, 2)


class RedisUnavailable(TemporaryError):
    """Redis cannot be reached or did not confirm a write as durable; nothing was
    acknowledged, and the sender should retry (503)."""


class RedisRefused(PermanentError):
    """Redis refused us (wrong password, missing permission) or is set up so that a write it
    acknowledges could still be lost; the configuration must change."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Address:
    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    tls: bool = False
    username: str | None = None

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}/{self.db}"


@dataclass(frozen=True, kw_only=True, slots=True)
class JournalSettings:
    """``serve --journal URL --journal-password-file FILE --journal-replicas N``."""

    url: str
    password_file: Path | None = None
    replicas: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S


def parse_url(url: str) -> Address:
    """``redis://[USER@]HOST[:PORT][/DB]`` or ``rediss://…``; a password in the URL is
    refused (it would show in the process list and in logs): use a password file."""
    parts = urlsplit(url)
    # Never echo a password, not even a refused one.
    shown = url.replace(f":{parts.password}@", ":***@") if parts.password else url
    problem = f"--journal {shown!r}"
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError([f"{problem}: must start with redis:// or rediss:// (TLS)"])
    if parts.password is not None:
        raise ConfigError(
            [f"{problem}: holds a password; put it in a file and pass --journal-password-file"]
        )
    if parts.query or parts.fragment:
        raise ConfigError([f"{problem}: takes no ?query or #fragment"])
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError([f"{problem}: the port must be a number from 1 to 65535"]) from None
    if not parts.hostname:
        raise ConfigError([f"{problem}: names no host (redis://HOST:PORT[/DB])"])
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ConfigError([f"{problem}: the path must be a database number, not {path!r}"])
    return Address(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
    )


def read_password(path: Path) -> str:
    """The file's content without its final line break (files written by editors and by
    Kubernetes Secrets differ there)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"--journal-password-file {path}: {exc.strerror}"]) from exc
    password = text.removesuffix("\n").removesuffix("\r")
    if not password or "\n" in password:
        raise ConfigError([f"--journal-password-file {path}: must hold the password on one line"])
    return password


@contextlib.contextmanager
def mapped(address: Address, doing: str) -> Iterator[None]:
    """redis-py's exceptions turned into ours, saying what we were doing and where; and a
    cancellation redis-py swallowed raised again (see :func:`_cancelled`)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        _cancelled()
        raise _ours(address, doing, exc) from exc
    _cancelled()


def _ours(address: Address, doing: str, exc: BaseException) -> Exception:
    if isinstance(exc, AuthenticationError | AuthorizationError) or str(exc).startswith(
        ("NOPERM", "WRONGPASS", "NOAUTH")
    ):
        return RedisRefused(
            f"Redis at {address} refused us while {doing}: {exc} "
            "(check --journal-password-file and the user's ACL)"
        )
    if isinstance(exc, BusyLoadingError | RedisConnectionError | RedisTimeoutError | OSError):
        return RedisUnavailable(f"Redis at {address} is unavailable while {doing}: {exc}")
    return RedisUnavailable(f"Redis at {address} failed {doing}: {exc}")


def _cancelled() -> None:
    """Raise CancelledError when our task is being cancelled. redis-py (8.1, Python 3.11)
    often returns normally, or with a connection error, from a command whose task was
    cancelled meanwhile (432 of 500 cancelled PING loops here; redis/redis-py#2028, #2551):
    without this, a cancelled loop of Redis calls would never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Connection:
    """One client (a pool of connections) to the journal's Redis, and how to make a write
    durable there."""

    def __init__(
        self, client: aioredis.Redis, address: Address, *, replicas: int, timeout_s: float
    ) -> None:
        self.client = client
        # redis-py leaves execute_command (for commands it has no method for) untyped.
        self._raw: Any = client
        self.address = address
        self.replicas = replicas
        self.timeout_s = timeout_s
        # Set by check(): WAITAOF where the server has it, else its settings are trusted.
        self.waitaof = False

    def errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return mapped(self.address, doing)

    async def forget_idle(self) -> None:
        """Close the pool's idle connections. After Redis restarted, each of them still looks
        open and would fail the next command it carries (a 503 for a batch that could have
        been stored): they are opened again when next used."""
        with self.errors("closing idle connections"):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    async def check(self) -> None:
        """Raise unless a write this server confirms is on its disk (and on ``replicas``
        replicas): with WAITAOF, that the AOF is on; before Redis 7.2, that every write is
        fsynced before its answer (``appendonly yes``, ``appendfsync always``)."""
        with self.errors("checking that it stores writes durably"):
            info = await self.client.info("server")
            version = _version(str(info.get("redis_version", "0")))
            self.waitaof = version >= WAITAOF_SINCE
            if self.waitaof:
                try:
                    await self._raw.execute_command("WAITAOF", 1, 0, 0)
                except ResponseError as exc:
                    raise RedisRefused(
                        f"Redis at {self.address} cannot confirm durable writes ({exc}); "
                        "set appendonly yes"
                    ) from exc
            else:
                await self._check_settings()

    async def _check_settings(self) -> None:
        try:
            found = {
                **await self.client.config_get("appendonly"),
                **await self.client.config_get("appendfsync"),
            }
        except ResponseError as exc:
            raise RedisRefused(
                f"Redis at {self.address} does not let us read its AOF settings ({exc}); "
                "use Redis or Valkey ≥ 7.2 (WAITAOF) or allow CONFIG GET"
            ) from exc
        settings = {str(k): str(v) for k, v in found.items()}
        if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
            raise RedisRefused(
                f"Redis at {self.address} has appendonly {settings.get('appendonly')}, "
                f"appendfsync {settings.get('appendfsync')}: it would acknowledge writes a "
                "crash can lose; set appendonly yes and appendfsync always (or use Redis ≥ 7.2)"
            )

    def durable_commands(self, pipe: Any) -> None:
        """Queue, behind a write in a non-transactional pipeline, what waits for it to be
        durable; :meth:`confirm` reads their answers."""
        wait_ms = int(self.timeout_s * 1000)
        if self.waitaof:
            pipe.execute_command("WAITAOF", 1, self.replicas, wait_ms)
        elif self.replicas:
            pipe.execute_command("WAIT", self.replicas, wait_ms)

    def confirm(self, answers: list[Any]) -> None:
        """Raise :class:`RedisUnavailable` unless the answers of :meth:`durable_commands`
        (the tail of ``answers``) say the write reached enough disks and replicas."""
        if self.waitaof:
            local, replicas = answers[-1]
            if int(local) < 1 or int(replicas) < self.replicas:
                raise RedisUnavailable(
                    f"Redis at {self.address} fsynced the write on {local} server(s) and "
                    f"{replicas} of {self.replicas} replica(s) in time; not acknowledged"
                )
        elif self.replicas and int(answers[-1]) < self.replicas:
            raise RedisUnavailable(
                f"only {answers[-1]} of {self.replicas} Redis replica(s) at {self.address} "
                "confirmed the write in time; not acknowledged"
            )

    async def close(self) -> None:
        await self.client.aclose()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


async def connect(settings: JournalSettings) -> Connection:
    """A checked connection: raises :class:`ConfigError` or :class:`RedisRefused`
    (permanent) or :class:`RedisUnavailable` (try again later), each one line."""
    address = parse_url(settings.url)
    if settings.replicas < 0:
        raise ConfigError([f"--journal-replicas {settings.replicas}: must be 0 or more"])
    # In a thread: the password file is read from disk, and redis-py reads its own package
    # metadata from disk for every new client.
    client = await asyncio.to_thread(_client, address, settings)
    connection = Connection(
        client, address, replicas=settings.replicas, timeout_s=settings.timeout_s
    )
    try:
        with connection.errors("connecting"):
            await client.ping()
        await connection.check()
    except BaseException:
        await client.aclose()
        raise
    log.info(
        "journal: Redis at %s (%s)",
        address,
        "WAITAOF" if connection.waitaof else "appendfsync always",
    )
    return connection


def _client(address: Address, settings: JournalSettings) -> aioredis.Redis:
    password = read_password(settings.password_file) if settings.password_file else None
    return aioredis.Redis(
        host=address.host,
        port=address.port,
        db=address.db,
        username=address.username,
        password=password,
        ssl=address.tls,
        socket_timeout=settings.timeout_s + max(settings.timeout_s, 1.0),
        socket_connect_timeout=settings.timeout_s,
        # A failed write is answered 503 and retried by the sender; a hidden retry here
        # would only hold the request longer.
        retry=Retry(NoBackoff(), 0),
        protocol=3,
    )
