"""``/metrics`` in the Prometheus text format, read from the running pipeline at scrape time.

Nothing on the hot path is touched for it: the counters the pipeline keeps anyway (events,
skips by reason, journal backlog, commits and pushes per repository branch) are turned into
metric families when Prometheus asks.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from audit_reverser.cluster.resync import ResyncStats
from audit_reverser.cluster.rules import owner_of
from audit_reverser.gitstore.writer import PUSH_SECONDS_BUCKETS
from audit_reverser.ha.journal import RedisJournal
from audit_reverser.runtime import Runtime

Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily


class _RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime, resyncs: ResyncStats | None) -> None:
        self._runtime = runtime
        self._resyncs = resyncs

    def collect(self) -> Iterator[Family]:
        runtime = self._runtime
        stats = runtime.stats
        yield CounterMetricFamily(
            "audit_reverser_events_received", "Audit events received.", value=stats.received
        )
        yield CounterMetricFamily(
            "audit_reverser_events_kept", "Events that became commits.", value=stats.kept
        )
        skipped = CounterMetricFamily(
            "audit_reverser_events_skipped",
            "Events that made no commit, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.skipped.items()):
            skipped.add_metric([str(reason)], count)
        yield skipped
        batches = CounterMetricFamily(
            "audit_reverser_webhook_batches",
            "EventList requests to /audit-webhook, by HTTP status of the answer.",
            labels=["code"],
        )
        for code, count in sorted(stats.batches.items()):
            batches.add_metric([str(code)], count)
        yield batches
        targets = CounterMetricFamily(
            "audit_reverser_target_changes",
            "Changes handed to Git, per GitTarget (namespace/name).",
            labels=["target"],
        )
        for target, count in sorted(stats.kept_by_target.items()):
            targets.add_metric([target], count)
        yield targets
        journal = runtime.intake.journal
        yield GaugeMetricFamily(
            "audit_reverser_journal_backlog",
            "Accepted events not yet committed locally.",
            value=journal.backlog if journal is not None else 0,
        )
        intake = runtime.intake
        yield GaugeMetricFamily(
            "audit_reverser_events_in_memory",
            "Accepted events held in memory between the journal and the local commit.",
            value=intake.in_memory,
        )
        yield GaugeMetricFamily(
            "audit_reverser_events_in_memory_peak",
            "The most accepted events held in memory at once since start.",
            value=intake.in_memory_peak,
        )
        yield GaugeMetricFamily(
            "audit_reverser_ready", "1 when the receiver takes events.", value=int(runtime.ready())
        )
        yield _config_problems(runtime.problems)
        labels = ["repository"]
        commits = CounterMetricFamily("audit_reverser_commits", "Commits made.", labels=labels)
        failed = CounterMetricFamily(
            "audit_reverser_commit_failures", "Commits that failed (Git errors).", labels=labels
        )
        pushes = CounterMetricFamily(
            "audit_reverser_pushes", "Pushes, by result.", labels=[*labels, "result"]
        )
        pushed = CounterMetricFamily(
            "audit_reverser_pushed_commits", "Commits pushed.", labels=labels
        )
        unpushed = GaugeMetricFamily(
            "audit_reverser_unpushed_commits", "Commits waiting in the mirror.", labels=labels
        )
        last = GaugeMetricFamily(
            "audit_reverser_last_push_timestamp_seconds",
            "When the last successful push ended.",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            "audit_reverser_push_duration_seconds",
            "How long pushes took, failed ones included.",
            labels=labels,
        )
        for writer in runtime.writers.values():
            name = [writer.name]
            s = writer.stats
            commits.add_metric(name, s.commits)
            failed.add_metric(name, s.failed)
            pushes.add_metric([writer.name, "ok"], s.pushes)
            pushes.add_metric([writer.name, "failed"], s.push_failures)
            pushed.add_metric(name, s.pushed_commits)
            unpushed.add_metric(name, writer.mirror.unpushed)
            if s.last_push_at is not None:
                last.add_metric(name, s.last_push_at.timestamp())
            # One count per bound, and a last one for longer pushes (the +Inf bucket).
            cumulative = list(itertools.accumulate(s.push_histogram))
            buckets = [
                *(
                    (str(bound), count)
                    for bound, count in zip(PUSH_SECONDS_BUCKETS, cumulative, strict=False)
                ),
                ("+Inf", cumulative[-1]),
            ]
            duration.add_metric(name, buckets=buckets, sum_value=s.push_seconds)
        yield from (commits, failed, pushes, pushed, unpushed, last, duration)
        if self._resyncs is not None:
            yield from _resync_families(self._resyncs)
        if runtime.redis_journal is not None:
            yield from _shared_journal_families(runtime.redis_journal)


def _shared_journal_families(journal: RedisJournal) -> Iterator[Family]:
    lease = journal.lease
    held = GaugeMetricFamily(
        "audit_reverser_lease_held",
        "1 while this replica holds the lane's lease (writes it), by its own clock.",
        labels=["lane"],
    )
    held.add_metric([lease.lane], int(lease.held))
    taken = CounterMetricFamily(
        "audit_reverser_lease_takeovers",
        "Times this replica took the lane's lease (a start, or after another's expired).",
        labels=["lane"],
    )
    taken.add_metric([lease.lane], lease.taken)
    yield held
    yield taken
    yield GaugeMetricFamily(
        "audit_reverser_stream_backlog",
        "Events stored in the shared journal's streams and not yet pushed, all lanes.",
        value=journal.stream_backlog,
    )


def _config_problems(problems: list[str]) -> GaugeMetricFamily:
    """Problems per object (``kind``, ``object`` namespace/name): an alert on any value
    above 0 finds every broken object, whichever way the rules were read."""
    family = GaugeMetricFamily(
        "audit_reverser_config_problems",
        "Problems of configuration objects that are left out or cannot do all their work "
        "(see /readyz?verbose and the log).",
        labels=["kind", "object"],
    )
    counts: Counter[tuple[str, str]] = Counter()
    for problem in problems:
        owner = owner_of(problem)
        kind, namespace, name = owner if owner is not None else ("", "", "")
        counts[kind, f"{namespace}/{name}" if namespace else name] += 1
    for labels, count in sorted(counts.items()):
        family.add_metric(list(labels), count)
    return family


def _resync_families(stats: ResyncStats) -> Iterator[Family]:
    runs = CounterMetricFamily(
        "audit_reverser_resync_runs",
        "Resyncs of every GitTarget, by result (failed: some could not be compared).",
        labels=["result"],
    )
    runs.add_metric(["ok"], stats.runs_ok)
    runs.add_metric(["failed"], stats.runs_failed)
    yield runs
    if stats.last_ok_at is not None:
        yield GaugeMetricFamily(
            "audit_reverser_last_resync_timestamp_seconds",
            "When the last resync of every GitTarget ended.",
            value=stats.last_ok_at.timestamp(),
        )
    for name, counts, meaning in (
        ("resync_commits", stats.commits, "[RESYNC] commits made"),
        ("resync_files_updated", stats.files_set, "Files a resync wrote (new or different)"),
        ("resync_files_removed", stats.files_removed, "Files of gone objects a resync removed"),
        (
            "resync_files_left",
            stats.files_left,
            "Files a resync left to changes made while it listed",
        ),
    ):
        family = CounterMetricFamily(
            f"audit_reverser_{name}", f"{meaning}, per GitTarget.", labels=["target"]
        )
        for target, count in sorted(counts.items()):
            family.add_metric([target], count)
        yield family


def exposition(runtime: Runtime, resyncs: ResyncStats | None = None) -> bytes:
    """The metrics; ``resyncs`` when periodic resyncs run (cluster mode)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RuntimeCollector(runtime, resyncs))
    return generate_latest(registry)
