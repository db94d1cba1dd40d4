"""An event that cannot be processed for a while (the Kubernetes API away) is held and tried
again in the same run: its commit lands once the API answers, without a restart, and its
journal record is done then."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from audit_reverser.cluster.api import ApiUnavailable
from audit_reverser.events import ObjectRef
from audit_reverser.ingest import intake as intake_module
from tests.conftest import configmap, event, eventually, start_harness
from tests.test_conflicts import _DiskFullOnce


class _AwayThenBack:
    """The object source (the cluster's API) that does not answer its first ``away`` reads."""

    def __init__(self, away: int, objects: Mapping[str, dict[str, Any]]) -> None:
        self.away = away
        self.objects = objects
        self.reads = 0

    async def read(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        self.reads += 1
        if self.reads <= self.away:
            raise ApiUnavailable("GET configmaps: connection refused (5 tries)")
        return self.objects.get(ref.name)

    async def names(self, ref: ObjectRef) -> set[str]:
        return set(self.objects)


@pytest.mark.parametrize("journal", [True, False], ids=["serve", "replay"])
async def test_an_event_held_while_the_api_is_away_is_committed_once_it_answers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    journal: bool,
) -> None:
    monkeypatch.setattr(intake_module, "HELD_RETRY_MIN_S", 0.05)
    source = _AwayThenBack(away=3, objects={"demo": configmap(data={"from": "api"})})
    harness = await start_harness(tmp_path, settings={"journal": journal}, source=source)
    try:
        with caplog.at_level(logging.INFO):
            # Metadata level: no body, the object comes from the API.
            await harness.send(
                event("create", level="Metadata", body=None, user="jane@example.com")
            )
            await harness.send(event("create", name="other", body=configmap("other")))

            async def committed() -> bool:
                await harness.sync()
                return "live/v1/configmaps/default/demo.yaml" in await harness.files()

            await eventually(committed)
        assert await harness.files() == [
            "live/v1/configmaps/default/demo.yaml",
            "live/v1/configmaps/default/other.yaml",
        ]
        assert "from: api" in await harness.show("live/v1/configmaps/default/demo.yaml")
        assert await harness.log("%an %s") == [
            "alice@example.com [CREATE] v1/configmaps/default/other",  # not held behind it
            "jane@example.com [CREATE] v1/configmaps/default/demo",
        ]
        assert source.reads == 4  # held after the first, tried again until it answered
        assert "held: GET configmaps: connection refused" in caplog.text
        assert "1 held events went through" in caplog.text
        if journal:  # its record is done: nothing waits for the next start
            assert harness.runtime.intake.journal is not None
            await eventually(lambda: harness.runtime.intake.journal.backlog == 0)
    finally:
        await harness.runtime.close()


async def test_events_still_held_at_the_stop_wait_in_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The API does not come back before the stop: the event stays in the journal, and the
    next start commits it."""
    monkeypatch.setattr(intake_module, "HELD_RETRY_MIN_S", 0.05)
    away = _AwayThenBack(away=10**9, objects={})
    harness = await start_harness(tmp_path, settings={"journal": True}, source=away)
    await harness.send(event("create", level="Metadata", body=None, user="jane@example.com"))
    await eventually(lambda: away.reads >= 3)  # held, and tried again
    with caplog.at_level(logging.WARNING):
        await harness.runtime.close()
    assert "1 held events stay in the journal for the next start" in caplog.text
    assert await harness.files() == []

    back = _AwayThenBack(away=0, objects={"demo": configmap(data={"from": "api"})})
    harness = await start_harness(tmp_path, settings={"journal": True}, source=back)
    try:
        await harness.sync()
        assert await harness.files() == ["live/v1/configmaps/default/demo.yaml"]
        assert await harness.log("%an") == ["jane@example.com"]
    finally:
        await harness.runtime.close()


async def test_events_whose_commit_failed_are_committed_later_in_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror's disk is full for a moment: the commits made are dropped, and their
    events are processed again in this run instead of waiting for the next start."""
    monkeypatch.setattr(intake_module, "HELD_RETRY_MIN_S", 0.05)
    harness = await start_harness(tmp_path, settings={"journal": True})
    [writer] = harness.runtime.writers.values()
    full = _DiskFullOnce(writer.mirror._objects)
    writer.mirror._objects.write_pack = full  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO):
            await harness.send(
                event("create", name="a", body=configmap("a"), user="jane@example.com"),
                event("create", name="b", body=configmap("b")),
            )

            async def committed() -> bool:
                await harness.sync()
                return len(await harness.files()) == 2

            await eventually(committed)
        assert full.failed
        assert await harness.log("%an %s") == [
            "jane@example.com [CREATE] v1/configmaps/default/a",
            "alice@example.com [CREATE] v1/configmaps/default/b",
        ]
        assert "No space left on device; tried again in" in caplog.text
        assert harness.runtime.intake.journal is not None
        await eventually(lambda: harness.runtime.intake.journal.backlog == 0)
    finally:
        await harness.runtime.close()
