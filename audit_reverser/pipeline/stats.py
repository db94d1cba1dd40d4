"""Counters of what happened to events, shown in replay summaries and (later) metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from audit_reverser.pipeline.filter import Skip


@dataclass(kw_only=True, slots=True)
class PipelineStats:
    received: int = 0
    kept: int = 0
    skipped: Counter[Skip] = field(default_factory=Counter)

    def skip(self, reason: Skip, count: int = 1) -> None:
        self.skipped[reason] += count
