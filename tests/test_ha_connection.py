"""Reaching the shared journal's Redis: the URL, the password file, and one clear error for
each way it can go wrong, against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit_reverser.errors import ConfigError
from audit_reverser.ha.connection import (
    Address,
    Connection,
    JournalSettings,
    RedisRefused,
    RedisUnavailable,
    connect,
    parse_url,
    read_password,
)
from audit_reverser.ha.stream import Incoming, StreamJournal
from tests.conftest import require
from tests.gitservers import free_port
from tests.redisserver import REDIS_SERVER, RedisServer


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://valkey", Address(host="valkey")),
        ("redis://valkey.ns.svc:6380/3", Address(host="valkey.ns.svc", port=6380, db=3)),
        ("rediss://writer@10.0.0.7/0", Address(host="10.0.0.7", tls=True, username="writer")),
        ("redis://[::1]:7000", Address(host="::1", port=7000)),
    ],
)
def test_journal_url_names_host_port_database_and_tls(url: str, address: Address) -> None:
    assert parse_url(url) == address


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+http://valkey:6379", "must start with redis:// or rediss://"),
        ("redis://:hunter2@valkey", "--journal-password-file"),
        ("redis://valkey/zero", "database number"),
        ("redis://valkey:99999", "port must be a number"),
        ("redis:///0", "names no host"),
        ("redis://valkey?db=1", "no ?query"),
    ],
)
def test_bad_journal_url_is_one_line_naming_the_flag(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_url(url)
    assert says in str(caught.value)
    assert str(caught.value).startswith("--journal 'redis")
    assert "\n" not in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_password_file_is_read_without_its_line_break(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("s3cret\n")
    assert read_password(tmp_path / "password") == "s3cret"


@pytest.mark.parametrize("content", [None, "", "two\nlines\n"])
def test_bad_password_file_names_the_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "password"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"--journal-password-file {path}"):
        read_password(path)


async def _connect(server: RedisServer, **overrides: object) -> Connection:
    options: dict[str, object] = {"url": server.url, "password_file": server.password_file}
    options.update(overrides)
    return await connect(JournalSettings(**options))  # type: ignore[arg-type]


async def test_right_password_connects(redis_server: RedisServer) -> None:
    connection = await _connect(redis_server)
    try:
        assert await connection.client.ping()
    finally:
        await connection.close()


async def test_wrong_password_is_refused_with_one_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    await asyncio.to_thread((tmp_path / "wrong").write_text, "not-the-password\n")
    with pytest.raises(RedisRefused) as caught:
        await _connect(redis_server, password_file=tmp_path / "wrong")
    message = str(caught.value)
    assert f"127.0.0.1:{redis_server.port}" in message
    assert "--journal-password-file" in message
    assert "not-the-password" not in message
    assert "\n" not in message


async def test_missing_password_is_refused(redis_server: RedisServer) -> None:
    with pytest.raises(RedisRefused, match="--journal-password-file"):
        await _connect(redis_server, password_file=None)


async def test_unreachable_redis_is_temporary() -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    with pytest.raises(RedisUnavailable, match=f"{url}/0 is unavailable while connecting"):
        await connect(JournalSettings(url=url, timeout_s=1.0))


@pytest.fixture
def redis_without_aof(tmp_path: Path) -> Iterator[RedisServer]:
    require(REDIS_SERVER, "redis-server")
    server = RedisServer(tmp_path / "redis", appendonly="no")
    server.start()
    yield server
    server.stop()


async def test_redis_without_aof_is_refused(redis_without_aof: RedisServer) -> None:
    """A server that keeps writes only in memory would acknowledge what a restart loses."""
    with pytest.raises(RedisRefused, match="appendonly"):
        await _connect(redis_without_aof)


async def test_missing_redis_replicas_fail_the_write(redis_server: RedisServer) -> None:
    """--journal-replicas 1 with no replica attached: the append is not confirmed, so the
    caller must not acknowledge it."""
    connection = await _connect(redis_server, replicas=1, timeout_s=0.2)
    journal = StreamJournal(connection)
    try:
        with pytest.raises(RedisUnavailable, match="replica"):
            await journal.append(
                [Incoming(audit_id="a-1", cluster="", event=b"{}", lanes=["main"])]
            )
    finally:
        await connection.close()


def test_negative_replicas_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--journal-replicas -1"):
        asyncio.run(connect(JournalSettings(url="redis://127.0.0.1", replicas=-1)))


async def test_aof_switched_off_while_running_is_found_by_the_next_check(
    redis_server: RedisServer,
) -> None:
    """What a readiness probe will see when someone turns durability off under us."""
    connection = await _connect(redis_server)
    try:
        await connection.check()
        await connection.client.config_set("appendonly", "no")
        with pytest.raises(RedisRefused, match="appendonly"):
            await connection.check()
    finally:
        await connection.close()
