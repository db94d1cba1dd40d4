"""Wiring: one settings object and a config in, running writers and intake out.

Targets that point at the same repository branch (by normalized URL) share one writer, so
their commits form one ordered history; its push policy is the most eager of its providers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from audit_reverser.config.model import Config, Key, PushPolicy
from audit_reverser.errors import AuditReverserError
from audit_reverser.gitstore.repository import Mirror
from audit_reverser.gitstore.transport import mirror_name, remote_key, transport_for
from audit_reverser.gitstore.types import Identity
from audit_reverser.gitstore.writer import BranchWriter
from audit_reverser.ingest.intake import Intake
from audit_reverser.pipeline.processor import Processor
from audit_reverser.pipeline.stats import PipelineStats

log = logging.getLogger(__name__)

DEFAULT_COMMITTER = Identity(name="audit-reverser", email="audit-reverser@audit-reverser.invalid")


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    state_dir: Path
    committer: Identity = DEFAULT_COMMITTER
    # Only the embedded default creates a missing local remote: for a configured one, a
    # missing repository is far more likely a typo than a wish.
    create_local_remotes: bool = False
    queue_size: int = 10_000


class Runtime:
    def __init__(self, config: Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.writers: dict[tuple[str, str], BranchWriter] = {}
        sinks: dict[Key, BranchWriter] = {}
        policies: dict[tuple[str, str], list[PushPolicy]] = {}
        for target in config.targets.values():
            provider = config.providers[target.provider_key]
            key = (remote_key(provider.url), target.branch)
            policies.setdefault(key, []).append(provider.push)
            if key not in self.writers:
                mirror = Mirror(
                    settings.state_dir / "mirrors" / mirror_name(provider.url, target.branch),
                    transport_for(provider.url),
                    target.branch,
                    settings.committer,
                    create_local_remote=settings.create_local_remotes,
                )
                self.writers[key] = BranchWriter(
                    mirror, push_interval_s=0, push_max_commits=1, queue_size=settings.queue_size
                )
            sinks[target.key] = self.writers[key]
        for key, writer in self.writers.items():
            writer.push_interval_s = min(p.interval_s for p in policies[key])
            writer.push_max_commits = min(p.max_commits for p in policies[key])
        self.stats = PipelineStats()
        self.processor = Processor(config, sinks, self.stats)
        self.intake = Intake(self.processor, queue_size=settings.queue_size)
        self.accepting = False

    async def start(self) -> None:
        results = await asyncio.gather(
            *(w.start() for w in self.writers.values()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(w.close() for w in self.writers.values()))
            raise errors[0]
        self.intake.start()
        self.accepting = True

    def ready(self) -> bool:
        return (
            self.accepting and self.intake.running and all(w.running for w in self.writers.values())
        )

    async def flush(self) -> list[str]:
        """Hand every queued event to Git and push; returns one line per failed push."""
        await self.intake.drain()
        failures = []
        for writer in self.writers.values():
            try:
                await writer.flush()
            except AuditReverserError as exc:
                failures.append(
                    f"{exc} ({writer.mirror.unpushed} commits kept in {writer.mirror.path})"
                )
        return failures

    async def close(self) -> None:
        """Stop accepting, commit what was accepted, push once, stop."""
        self.accepting = False
        await self.intake.close()
        await asyncio.gather(*(w.close() for w in self.writers.values()))
