"""Which cluster a receiver given one cluster's API (``--kubeconfig``, ``--in-cluster``) is.

That cluster's events are written under each GitTarget's path as they are and answered from
the API; events posted under any other name are another cluster's: their files go to that
cluster's folder and those needing the API are skipped, never answered by the wrong API
(docs/fleet.md). The name is the user's (``serve --cluster NAME``), else the first cluster
name that posts, kept in the state directory so that a restart keeps it. Events posted
without a name are the home cluster's (the single-cluster layout).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from audit_reverser.files import replace_durably

log = logging.getLogger(__name__)

PIN_FILE = "cluster-name"


class HomeCluster:
    def __init__(self, *, name: str | None = None, pin_file: Path | None = None) -> None:
        self.name = name
        self._pin_file = pin_file
        self._unsaved = False

    @classmethod
    def load(cls, state_dir: Path, name: str | None = None) -> HomeCluster:
        """The home cluster: ``name`` when the user gave one, else the one pinned earlier
        (None until a cluster posts). Blocking file access: call it off the event loop."""
        pin_file = state_dir / PIN_FILE
        try:
            pinned: str | None = pin_file.read_text().strip() or None
        except FileNotFoundError:
            pinned = None
        home = cls(name=name or pinned, pin_file=pin_file)
        if name is not None and pinned is not None and pinned != name:
            log.warning(
                "this receiver is cluster %s (--cluster), it was %s: events posted to "
                "/audit-webhook/%s now go to that cluster's folder under each target",
                name,
                pinned,
                pinned,
            )
        if name is not None and pinned != name:
            home._save()
        elif pinned is not None:
            log.info("this receiver is cluster %s (pinned in %s)", pinned, pin_file)
        return home

    def owns(self, cluster: str) -> bool:
        """Whether events posted under ``cluster`` are this receiver's own; the first name
        seen becomes the home cluster when none is set."""
        if not cluster:
            return True
        if self.name is None:
            self.name = cluster
            self._unsaved = self._pin_file is not None
            log.info(
                "this receiver is cluster %s, the first name events were posted under; "
                "events of any other name go to that cluster's folder under each target and "
                "are never answered from this API (serve --cluster NAME sets it)",
                cluster,
            )
        return cluster == self.name

    async def claim(self, cluster: str) -> None:
        """Pin the home cluster before the events posted under ``cluster`` are journaled,
        so that after a restart they and later ones are read the same way."""
        self.owns(cluster)
        if self._unsaved:
            self._unsaved = False
            try:
                await asyncio.to_thread(self._save)
            except OSError as exc:  # the pin holds in memory; the next post tries again
                self._unsaved = True
                log.error("cannot keep the cluster name in %s: %s", self._pin_file, exc)

    def _save(self) -> None:
        assert self._pin_file is not None and self.name is not None
        self._pin_file.parent.mkdir(parents=True, exist_ok=True)
        replace_durably(self._pin_file, f"{self.name}\n".encode())
