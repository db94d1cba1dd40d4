"""/metrics of a real serve: the counters move as events come and commits are pushed."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    bare_repo,
    configmap,
    event,
    event_list,
    request,
    start_serve,
    write_config,
)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = request(port, "GET", "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_metrics_show_events_skips_commits_and_pushes(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote, max_commits=1)
    served = start_serve(tmp_path, "--config", str(config), "--state-dir", str(tmp_path / "s"))
    try:
        before = _scrape(served.port)
        assert before[("audit_reverser_events_received_total", ())] == 0
        assert before[("audit_reverser_ready", ())] == 1
        batch = event_list(event("create", body=configmap()), event("get", body=configmap()))
        assert request(served.port, "POST", "/audit-webhook", orjson.dumps(batch))[0] == 200
        assert request(served.port, "POST", "/audit-webhook", b"{not json")[0] == 400
        repository = (("repository", f"{remote}#main"),)
        deadline = time.monotonic() + 30  # a bound against hangs, not a speed to meet
        while True:
            after = _scrape(served.port)
            if after.get(("audit_reverser_pushed_commits_total", repository)) == 1:
                break
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
    finally:
        served.stop()
    assert after[("audit_reverser_events_received_total", ())] == 2
    assert after[("audit_reverser_events_kept_total", ())] == 1
    assert after[("audit_reverser_events_skipped_total", (("reason", "read-verb"),))] == 1
    assert after[("audit_reverser_commits_total", repository)] == 1
    assert after[("audit_reverser_pushes_total", (*repository, ("result", "ok")))] == 1
    assert after[("audit_reverser_unpushed_commits", repository)] == 0
    assert after[("audit_reverser_last_push_timestamp_seconds", repository)] > 0
    assert after[("audit_reverser_journal_backlog", ())] == 0
    assert after[("audit_reverser_webhook_batches_total", (("code", "200"),))] == 1
    assert after[("audit_reverser_webhook_batches_total", (("code", "400"),))] == 1
    assert after[("audit_reverser_target_changes_total", (("target", "team/live"),))] == 1
    assert after[("audit_reverser_push_duration_seconds_count", repository)] == 1
    assert (
        after[("audit_reverser_push_duration_seconds_bucket", (("le", "+Inf"), *repository))] == 1
    )
