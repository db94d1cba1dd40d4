"""Counters of what happened to events, shown in replay summaries and in /metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from audit_reverser.pipeline.filter import Skip


@dataclass(kw_only=True, slots=True)
class PipelineStats:
    received: int = 0
    kept: int = 0
    skipped: Counter[Skip] = field(default_factory=Counter)
    kept_by_target: Counter[str] = field(default_factory=Counter)  # "namespace/name"
    batches: Counter[int] = field(default_factory=Counter)  # webhook requests by HTTP status

    def skip(self, reason: Skip, count: int = 1) -> None:
        self.skipped[reason] += count
