"""One replica's lane driver as its own process, for the failure tests: SIGKILL, SIGSTOP and
SIGCONT act on a real process. Its Git side is plain ``git`` in a clone of a real bare
remote: one commit per event with an ``Audit-ID`` trailer, pushed without force.

    python -m tests.hareplica REDIS_URL PASSWORD_FILE WORKDIR NAME LEASE_S

WORKDIR is a clone of the remote; the replica logs to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path

from audit_reverser.errors import TemporaryError
from audit_reverser.ha.connection import JournalSettings, connect
from audit_reverser.ha.lanes import LaneDriver
from audit_reverser.ha.lease import Lease
from audit_reverser.ha.stream import Entry, StreamJournal

LANE = "remote@main"


async def git(workdir: Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(workdir),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise TemporaryError(f"git {' '.join(args)}: {err.decode().strip()}")
    return out.decode()


class GitSink:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    async def catch_up(self) -> Collection[str]:
        await git(self.workdir, "fetch", "-q", "origin")
        await git(self.workdir, "reset", "-q", "--hard", "origin/main")
        log = await git(
            self.workdir, "log", "--format=%(trailers:key=Audit-ID,valueonly)", "origin/main"
        )
        return {line.strip() for line in log.splitlines() if line.strip()}

    async def write(self, entries: Sequence[Entry], fence: Callable[[], Awaitable[None]]) -> None:
        await fence()
        for entry in entries:
            path = self.workdir / "events" / f"{entry.audit_id}.json"
            await asyncio.to_thread(path.parent.mkdir, exist_ok=True)
            await asyncio.to_thread(path.write_bytes, entry.event)
            await git(self.workdir, "add", str(path))
            message = f"event {entry.audit_id}\n\nAudit-ID: {entry.audit_id}\n"
            await git(self.workdir, "commit", "-q", "-m", message)
        await fence()
        await git(self.workdir, "push", "-q", "origin", "main")


async def main(url: str, password_file: str, workdir: str, name: str, lease_s: str) -> None:
    connection = await connect(JournalSettings(url=url, password_file=Path(password_file)))
    lease = Lease(connection, LANE, name, lease_s=float(lease_s))
    lane = StreamJournal(connection).lane(LANE, name)
    driver = LaneDriver(lease, lane, GitSink(Path(workdir)), retry_s=0.2)
    await driver.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"{sys.argv[4]} %(message)s")
    asyncio.run(main(*sys.argv[1:]))
