"""/metrics of a real serve: the counters move as events come and commits are pushed; the
shipped Grafana dashboard and alert rules name only metrics that /metrics exposes, every
metric has a panel, and promtool accepts every expression."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    REPO_ROOT,
    bare_repo,
    configmap,
    event,
    event_list,
    request,
    require,
    start_serve,
    write_config,
)

MONITORING = REPO_ROOT / "deploy" / "monitoring"
PROMTOOL = "/usr/bin/promtool"
METRIC = re.compile(r"\baudit_reverser_[a-z0-9_]+")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Samples only a serve in cluster mode shows (the periodic resync); tests/test_resync.py
# checks that its serve shows each of them, so that this list cannot drift.
CLUSTER_MODE_ONLY = frozenset(
    {
        "audit_reverser_resync_runs_total",
        "audit_reverser_last_resync_timestamp_seconds",
        "audit_reverser_resync_commits_total",
        "audit_reverser_resync_files_updated_total",
        "audit_reverser_resync_files_removed_total",
        "audit_reverser_resync_files_left_total",
    }
)
# Samples only while a configuration object is left out (tests/test_broken_objects.py
# reads them from a real serve).
ONLY_WHEN_BROKEN = frozenset({"audit_reverser_config_problems"})

# Samples only a serve with --journal redis://… shows; tests/test_ha_serve.py checks that its
# serve shows each of them.
SHARED_JOURNAL_ONLY = frozenset(
    {
        "audit_reverser_lease_held",
        "audit_reverser_lease_takeovers_total",
        "audit_reverser_stream_backlog",
    }
)
MODE_ONLY = CLUSTER_MODE_ONLY | SHARED_JOURNAL_ONLY


def _scrape(port: int) -> tuple[Samples, set[str]]:
    """The samples by (name, labels), and the names of the metric families."""
    status, body = request(port, "GET", "/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(body.decode()))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }
    return samples, {family.name for family in families}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Samples, Samples, set[str]]:
    """A real serve's /metrics before and after one kept and one skipped event were
    committed and pushed, and the names of the families it exposes."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote, max_commits=1)
    served = start_serve(tmp_path, "--config", str(config), "--state-dir", str(tmp_path / "s"))
    try:
        before, _ = _scrape(served.port)
        batch = event_list(event("create", body=configmap()), event("get", body=configmap()))
        assert request(served.port, "POST", "/audit-webhook", orjson.dumps(batch))[0] == 200
        assert request(served.port, "POST", "/audit-webhook", b"{not json")[0] == 400
        repository = (("repository", f"{remote}#main"),)
        deadline = time.monotonic() + 30  # a bound against hangs, not a speed to meet
        while True:
            after, families = _scrape(served.port)
            if after.get(("audit_reverser_pushed_commits_total", repository)) == 1:
                break
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
    finally:
        served.stop()
    return before, after, families


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())
    ]
    expressions += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return expressions


def _alert_expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_metrics_show_events_skips_commits_and_pushes(
    scraped: tuple[Samples, Samples, set[str]],
) -> None:
    before, after, _ = scraped
    assert before[("audit_reverser_events_received_total", ())] == 0
    assert before[("audit_reverser_ready", ())] == 1
    (repository,) = {labels for name, labels in after if name == "audit_reverser_commits_total"}
    assert repository[0][1].endswith("remote.git#main")
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


def test_dashboard_and_alerts_name_only_metrics_that_serve_exposes(
    scraped: tuple[Samples, Samples, set[str]],
) -> None:
    _, after, _ = scraped
    exposed = {name for name, _ in after} | MODE_ONLY | ONLY_WHEN_BROKEN
    for expression in [*_dashboard_expressions(), *_alert_expressions()]:
        named = METRIC.findall(expression)
        assert named, expression
        assert set(named) <= exposed, expression


def test_every_metric_has_a_panel_and_a_line_in_the_docs(
    scraped: tuple[Samples, Samples, set[str]],
) -> None:
    _, _, plain = scraped
    families = plain | {name.removesuffix("_total") for name in MODE_ONLY}
    named = {name for e in _dashboard_expressions() for name in METRIC.findall(e)}
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    for family in families:
        assert any(name.startswith(family) for name in named), f"no panel shows {family}"
        assert f"`{family}" in operations, f"docs/operations.md does not list {family}"


def test_promtool_accepts_the_alerts_and_every_dashboard_expression(tmp_path: Path) -> None:
    require(PROMTOOL, "prometheus")
    # Grafana's variables, as Grafana would fill them in, then each expression as a recording
    # rule: promtool parses it with Prometheus' own PromQL parser.
    filled = [
        e.replace("$__rate_interval", "5m")
        .replace("$__range", "6h")
        .replace("$job", ".*")
        .replace("$repository", ".*")
        for e in _dashboard_expressions()
        if not e.startswith("label_values(")  # Grafana's own query function, not PromQL
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"audit_reverser:panel{n}", "expr": e} for n, e in enumerate(filled)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        [
            PROMTOOL,
            "check",
            "rules",
            str(tmp_path / "dashboard.yaml"),
            str(MONITORING / "alerts.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(filled)} rules found" in checked.stdout
