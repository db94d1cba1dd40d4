"""The journal: what got a 200 survives, a full disk gets 503 and loses nothing, and a crash
between commit and checkpoint makes no duplicate commit."""

from __future__ import annotations

import asyncio
import errno
import shutil
from pathlib import Path

import orjson
import pytest

from audit_reverser.errors import AuditReverserError, PermanentError
from audit_reverser.journal import Journal, Record, Recovery, SegmentFile, read_segment
from tests.conftest import configmap, event, event_list, http_client, start_harness


def _segments(directory: Path) -> list[Path]:
    """Segment files that hold anything."""
    return [p for p in sorted(directory.glob("*.wal")) if p.stat().st_size]


async def _recovered(directory: Path, **options: float) -> tuple[Journal, Recovery]:
    journal = Journal(directory, **options)  # type: ignore[arg-type]
    return journal, await asyncio.to_thread(journal.recover)


async def _pending(journal: Journal, count: int, limit: int = 1000) -> list[Record]:
    """The next ``count`` records read back, ``limit`` at a time, as the intake reads them."""
    records: list[Record] = []
    while len(records) < count:
        records.extend((await journal.read(limit, 1 << 20)).records)
    return records


async def test_concurrent_appends_share_fsyncs_and_survive_a_restart(tmp_path: Path) -> None:
    journal, _ = await _recovered(tmp_path)

    async def append(n: int) -> list[int]:
        return await journal.append([(f"id-{n}", "prod", orjson.dumps({"n": n}))])

    seqs = await asyncio.gather(*(append(n) for n in range(50)))
    assert sorted(s for [s] in seqs) == list(range(1, 51))
    assert journal.fsyncs < 50  # group commit: waiting requests share a flush
    await journal.close()

    again, recovery = await _recovered(tmp_path)
    assert recovery.pending == 50
    pending = await _pending(again, 50, limit=7)
    assert [r.seq for r in pending] == list(range(1, 51))
    assert pending[7].audit_id == "id-7" and pending[7].cluster == "prod"
    assert orjson.loads(pending[7].event) == {"n": 7}
    await again.close()


async def test_a_torn_record_at_the_end_is_ignored(tmp_path: Path) -> None:
    journal, _ = await _recovered(tmp_path)
    await journal.append([("a", "", b"{}"), ("b", "", b"{}")])
    await journal.close()
    [segment] = await asyncio.to_thread(_segments, tmp_path)
    whole = await asyncio.to_thread(segment.read_bytes)
    await asyncio.to_thread(segment.write_bytes, whole + whole[: len(whole) // 2 - 3])

    records, clean = await asyncio.to_thread(read_segment, segment)
    assert [r.audit_id for r in records] == ["a", "b"] and not clean
    again, recovery = await _recovered(tmp_path)
    assert recovery.pending == 2
    await again.append([("c", "", b"{}")])
    assert [r.audit_id for r in await _pending(again, 3)] == ["a", "b", "c"]
    assert again.backlog == 3
    await again.close()


async def test_done_records_are_not_replayed_but_their_ids_are_remembered(tmp_path: Path) -> None:
    journal, _ = await _recovered(tmp_path, retain_s=3600)
    entries = [("a", "", b"{}"), ("b", "", b"{}"), ("c", "", b"{}")]
    first, second, third = await journal.append(entries)
    journal.done(first)
    journal.done(third, {"writer": "abc"})  # done out of order: the checkpoint waits for b
    await journal.close()
    again, recovery = await _recovered(tmp_path, retain_s=3600)
    assert [r.audit_id for r in await _pending(again, 2)] == ["b", "c"]
    assert list(recovery.handled) == ["a"]
    again.done(second)
    again.done(third)
    await again.close()

    compacted, recovery = await _recovered(tmp_path, retain_s=0)
    assert recovery.pending == 0 and list(recovery.handled) == ["a", "b", "c"]
    await compacted.checkpoint()  # nothing moved: no write, no compaction yet
    compacted.set_tips({"writer": None})
    await compacted.checkpoint()
    assert (
        await asyncio.to_thread(_segments, tmp_path) == []
    )  # everything done and older than retain_s: compacted away
    await compacted.close()


class FullDisk(SegmentFile):
    """A segment file on a disk that fills up when the test says so."""

    full = False

    def write(self, data: bytes) -> None:
        if FullDisk.full:
            super().write(data[:10])  # a partial write before the error, as a real disk does
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(data)


async def test_a_full_disk_gets_503_and_loses_nothing(tmp_path: Path) -> None:
    harness = await start_harness(tmp_path, settings={"journal": True, "journal_file": FullDisk})
    try:
        async with http_client(harness) as client:
            FullDisk.full = True
            batch = event_list(event("create", body=configmap("refused")))
            response = await client.post("/audit-webhook", json=batch)
            assert response.status == 503
            assert response.headers["Retry-After"]
            assert "disk full" in (await response.json())["message"]

            FullDisk.full = False  # space freed; the apiserver sends the batch again
            response = await client.post("/audit-webhook", json=batch)
            assert response.status == 200
            accepted = event_list(event("create", body=configmap("accepted")))
            assert (await client.post("/audit-webhook", json=accepted)).status == 200
        await harness.sync()
        assert await harness.subjects() == [
            "[CREATE] v1/configmaps/default/refused",
            "[CREATE] v1/configmaps/default/accepted",
        ]
    finally:
        FullDisk.full = False
        await harness.runtime.close()


async def test_a_batch_above_the_backlog_limit_gets_429(tmp_path: Path) -> None:
    harness = await start_harness(tmp_path, settings={"journal": True, "max_backlog": 2})
    try:
        async with http_client(harness) as client:
            batch = event_list(*(event("create", body=configmap(f"c{i}")) for i in range(3)))
            response = await client.post("/audit-webhook", json=batch)
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["details"] == {"retryAfterSeconds": 1}
            small = event_list(*(event("create", body=configmap(f"c{i}")) for i in range(2)))
            assert (await client.post("/audit-webhook", json=small)).status == 200
        await harness.sync()
        assert len(await harness.subjects()) == 2
    finally:
        await harness.runtime.close()


async def test_a_crash_between_commit_and_checkpoint_makes_no_duplicate_commit(
    tmp_path: Path,
) -> None:
    journal_settings = {"journal": True}
    first = await start_harness(tmp_path, settings=journal_settings)
    checkpoint = tmp_path / "state" / "journal" / "checkpoint.json"
    at_start = await asyncio.to_thread(checkpoint.read_bytes)
    async with http_client(first) as client:
        batch = event_list(
            event("create", body=configmap(rv="100")),
            # The same content again: no commit, and nothing tells a restart it was seen.
            event("update", body=configmap(rv="200")),
            event("update", body=configmap(rv="300", data={"greeting": "bye"})),
        )
        assert (await client.post("/audit-webhook", json=batch)).status == 200
    await first.sync()
    await first.runtime.close()
    # The process dies after its commits and before any checkpoint recorded them.
    await asyncio.to_thread(checkpoint.write_bytes, at_start)

    second = await start_harness(tmp_path, settings=journal_settings)
    await second.sync()
    stats = second.runtime.stats
    await second.runtime.close()
    assert await second.subjects() == [
        "[CREATE] v1/configmaps/default/demo",
        "[UPDATE] v1/configmaps/default/demo",
    ]
    assert "bye" in await second.show("live/v1/configmaps/default/demo.yaml")
    assert stats.skipped["older-than-stored"] == 2  # create and no-op update: superseded
    [writer] = second.runtime.writers.values()
    assert writer.stats.recovered == 1 and writer.stats.commits == 0

    # And the journal knows it now: a third start processes nothing again.
    third = await start_harness(tmp_path, settings=journal_settings)
    assert third.runtime.journal is not None and third.runtime.journal.backlog == 0
    await third.runtime.close()


async def test_a_resent_batch_after_a_restart_makes_no_second_commit(tmp_path: Path) -> None:
    settings = {"journal": True}
    batch = event_list(event("create", body=configmap()))
    for _ in range(2):  # the apiserver did not see our 200 and sends the batch again
        harness = await start_harness(tmp_path, settings=settings)
        async with http_client(harness) as client:
            assert (await client.post("/audit-webhook", json=batch)).status == 200
        await harness.sync()
        await harness.runtime.close()
    assert await harness.subjects() == ["[CREATE] v1/configmaps/default/demo"]
    assert harness.runtime.stats.skipped["duplicate-audit-id"] == 1


async def test_a_lost_mirror_is_rebuilt_and_still_makes_no_duplicate(tmp_path: Path) -> None:
    settings = {"journal": True}
    first = await start_harness(tmp_path, settings=settings)
    checkpoint = tmp_path / "state" / "journal" / "checkpoint.json"
    at_start = await asyncio.to_thread(checkpoint.read_bytes)
    async with http_client(first) as client:
        batch = event_list(event("create", body=configmap()))
        assert (await client.post("/audit-webhook", json=batch)).status == 200
    await first.sync()
    await first.runtime.close()
    await asyncio.to_thread(checkpoint.write_bytes, at_start)
    await asyncio.to_thread(shutil.rmtree, tmp_path / "state" / "mirrors")

    second = await start_harness(tmp_path, settings=settings)
    await second.sync()
    await second.runtime.close()
    assert await second.subjects() == ["[CREATE] v1/configmaps/default/demo"]


async def test_two_processes_cannot_share_a_state_directory(tmp_path: Path) -> None:
    first = await start_harness(tmp_path, settings={"journal": True})
    try:
        with pytest.raises(AuditReverserError, match="in use by another audit-reverser process"):
            await start_harness(tmp_path, settings={"journal": True})
    finally:
        await first.runtime.close()


async def test_a_lost_checkpoint_means_a_full_scan_and_still_no_duplicate(tmp_path: Path) -> None:
    settings = {"journal": True}
    first = await start_harness(tmp_path, settings=settings)
    async with http_client(first) as client:
        batch = event_list(
            event("create", body=configmap(rv="100")),
            event("update", body=configmap(rv="300", data={"greeting": "bye"})),
        )
        assert (await client.post("/audit-webhook", json=batch)).status == 200
    await first.sync()
    await first.runtime.close()
    await asyncio.to_thread((tmp_path / "state" / "journal" / "checkpoint.json").unlink)

    for _ in range(2):  # and once more: the first recovery must not forget what it found
        again = await start_harness(tmp_path, settings=settings)
        await again.sync()
        await again.runtime.close()
    assert await again.subjects() == [
        "[CREATE] v1/configmaps/default/demo",
        "[UPDATE] v1/configmaps/default/demo",
    ]


async def test_a_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    await asyncio.to_thread(directory.mkdir)
    await asyncio.to_thread((directory / "checkpoint.json").write_bytes, b"{not json")
    with pytest.raises(PermanentError, match="checkpoint.json is unreadable"):
        await _recovered(directory)


async def test_segments_rotate_and_every_record_survives(tmp_path: Path) -> None:
    journal, _ = await _recovered(tmp_path, segment_bytes=200)
    for n in range(10):
        await journal.append([(f"id-{n}", "", b'{"padding": "' + b"x" * 100 + b'"}')])
    await journal.close()
    assert len(await asyncio.to_thread(_segments, tmp_path)) == 5  # two records each
    again, recovery = await _recovered(tmp_path)
    assert recovery.pending == 10
    assert [r.audit_id for r in await _pending(again, 10, limit=3)] == [
        f"id-{n}" for n in range(10)
    ]
    await again.close()


async def test_readyz_goes_false_while_the_journal_cannot_be_written(tmp_path: Path) -> None:
    """Below the free-space reserve every batch would get 503: the pod says it is not ready
    (and why), and is ready again once space is freed, without a restart."""
    settings = {"journal": True, "journal_min_free_bytes": 1 << 62}  # more than any disk
    harness = await start_harness(tmp_path, settings=settings)
    try:
        async with http_client(harness) as client:
            assert harness.runtime.journal is not None
            await harness.runtime.journal.look_at_disk()  # as it does every 0.2 s
            response = await client.get("/readyz", params={"verbose": ""})
            assert response.status == 503
            text = await response.text()
            assert "[-]journal failed: " in text and "below the reserve" in text
            assert "readyz check failed" in text
            harness.runtime.journal.min_free_bytes = 0  # space freed
            await harness.runtime.journal.look_at_disk()
            response = await client.get("/readyz", params={"verbose": ""})
            assert response.status == 200 and "[+]journal ok" in await response.text()
            assert (await client.get("/readyz")).status == 200
    finally:
        await harness.runtime.close()


async def test_a_run_that_stored_nothing_leaves_no_segment_to_delete_under_the_next(
    tmp_path: Path,
) -> None:
    """Two starts without events share one empty segment file; compacting the first run's
    segments must not delete the file the second run appends to."""
    for _ in range(2):
        journal, _ = await _recovered(tmp_path, retain_s=0)
        await journal.close()
    journal, _ = await _recovered(tmp_path, retain_s=0)
    [seq] = await journal.append([("kept", "", b"{}")])
    journal.set_tips({"writer": None})  # progress to save: the checkpoint compacts
    await journal.checkpoint()
    await journal.close()
    again, recovery = await _recovered(tmp_path)
    assert recovery.pending == 1
    assert [r.audit_id for r in await _pending(again, 1)] == ["kept"]
    await again.close()
