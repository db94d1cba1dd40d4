"""Who asked for a pending deletion outlives the writer with ``serve --journal redis://…``:
the memories are in Redis, not in a replica's state directory (an emptyDir cache there).

Real ``serve`` processes, a real ``redis-server`` and a real bare remote read back with plain
``git``: bob deletes a PVC held by a finalizer through replica A (the writer); A is killed
once its entries are acknowledged; B takes over, and the pvc-protection controller's
finishing write, sent to B, is a ``[DELETE]`` commit in bob's name.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from audit_reverser.ha.connection import JournalSettings, connect
from audit_reverser.ha.deletions import RedisDeletions
from audit_reverser.ha.lease import Lease
from audit_reverser.ha.stream import StaleWriter
from audit_reverser.pipeline.deletions import Saved
from tests.conftest import bare_repo, git, git_files, start_serve
from tests.redisserver import RedisServer
from tests.test_deletions import (
    PVC_PROTECTION,
    _post,
    _pvc_event,
    by_controller,
    deleted,
    pvc,
)
from tests.test_ha_serve import STREAM, _serve_args, _wait_until

DELETIONS = "audit-reverser:deletions"
CREATED = "[CREATE] v1/persistentvolumeclaims/shop/data"


def _subjects(remote: Path) -> list[str]:
    return git(remote, "log", "--format=%s", "main").splitlines() if _pushed(remote) else []


def _pushed(remote: Path) -> bool:
    return git(remote, "rev-list", "--all") != ""


def test_a_new_writer_finishes_a_deletion_in_the_name_of_who_asked_the_old_one(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    args = [
        *_serve_args(tmp_path, remote, redis_server, max_commits=1, interval="100ms"),
        "--journal-lease",
        "2",
    ]
    first = start_serve(tmp_path, *args, "--state-dir", str(tmp_path / "a"))
    lease = "audit-reverser:lease:intake"
    _wait_until(lambda: redis_server.command("EXISTS", lease) == "1", "the first lease")
    second = start_serve(tmp_path, *args, "--state-dir", str(tmp_path / "b"))

    protected = pvc("200", ["kubernetes.io/pvc-protection"])
    asked = deleted(pvc("202"), "202", finalizers=["kubernetes.io/pvc-protection"])
    _post(
        first.port,
        _pvc_event("create", protected, user="alice@example.com"),
        _pvc_event("delete", asked, user="bob@example.com", audit_id="bob-deletes-pvc"),
    )
    # Both entries acknowledged (bob's delete changes nothing in Git): the new writer will not
    # read bob's delete again, only what the old one kept of it.
    _wait_until(lambda: _subjects(remote) == [CREATED], "the writer's push")
    _wait_until(lambda: redis_server.command("XLEN", STREAM) == "0", "the acknowledgements")
    assert "bob-deletes-pvc" in redis_server.command("GET", DELETIONS)
    first.kill()

    released = deleted(pvc("203"), "203", finalizers=None)
    _post(
        second.port,
        by_controller(
            _pvc_event("update", released, audit_id="controller-releases"), PVC_PROTECTION
        ),
    )
    _wait_until(lambda: len(_subjects(remote)) == 2, "the new writer's push")
    log = second.stop()
    assert second.process.returncode == 0, log

    assert git_files(remote) == []
    message = git(remote, "log", "-1", "--format=%an <%ae>%n%B", "main")
    assert message.startswith("bob@example.com <bob@example.com>\n[DELETE] v1/persistent"), message
    assert f"Deleted-By: {PVC_PROTECTION}\n" in message
    assert "Delete-Audit-ID: bob-deletes-pvc\n" in message
    assert "Audit-ID: controller-releases\n" in message


def _memories(audit_id: str) -> Saved:
    request = {
        "username": "bob@example.com",
        "groups": ["system:authenticated"],
        "impersonated_by": None,
        "audit_id": audit_id,
        "user_agent": "kubectl/v1.31.0",
        "source_ips": ["10.0.0.7"],
        "person": True,
        "at": 1.0,
    }
    return {
        "requests": [request],  # type: ignore[list-item]
        "objects": [(["", "", "persistentvolumeclaims", "shop", "data"], 0)],
        "uids": [],
        "owners": [],
    }


async def test_a_writer_that_lost_its_lease_cannot_overwrite_the_new_writers_memories(
    redis_server: RedisServer,
) -> None:
    settings = JournalSettings(url=redis_server.url, password_file=redis_server.password_file)
    old, new = await connect(settings), await connect(settings)
    try:
        paused = Lease(old, "intake", "a", lease_s=0.5)
        holder = Lease(new, "intake", "b", lease_s=0.5)
        assert await paused.acquire()
        stale = RedisDeletions(old, lambda: paused.fence)
        await stale.save(_memories("asked-under-a"))
        while not await holder.acquire():  # noqa: ASYNC110 - a key expiring in Redis
            await asyncio.sleep(0.05)
        current = RedisDeletions(new, lambda: holder.fence)
        await current.save(_memories("asked-under-b"))

        with pytest.raises(StaleWriter):
            await stale.save(_memories("late-save-under-a"))
        with pytest.raises(StaleWriter):
            await stale.set_aside("is damaged")
        saved = await current.load()
        assert saved is not None and saved["requests"][0]["audit_id"] == "asked-under-b"
    finally:
        await old.close()
        await new.close()


async def test_damaged_memories_in_redis_are_set_aside(redis_server: RedisServer) -> None:
    settings = JournalSettings(url=redis_server.url, password_file=redis_server.password_file)
    connection = await connect(settings)
    try:
        lease = Lease(connection, "intake", "a")
        assert await lease.acquire()
        store = RedisDeletions(connection, lambda: lease.fence)
        await asyncio.to_thread(redis_server.command, "SET", DELETIONS, "{not json")
        assert await store.load() is None
        await asyncio.to_thread(redis_server.command, "SET", DELETIONS, '{"requests": 1}')
        assert await store.load() is None
        assert await store.load() is None  # set aside: nothing to read any more
        kept = await asyncio.to_thread(redis_server.command, "GET", f"{DELETIONS}:bad")
        assert kept == r'"{\"requests\": 1}"'
    finally:
        await connection.close()
