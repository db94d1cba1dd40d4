"""The command line as a user runs it: real processes, real repositories, plain git."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from tests.conftest import (
    CORPUS,
    bare_repo,
    configmap,
    event,
    event_list,
    free_port,
    git,
    git_files,
    git_subjects,
    write_config,
)


def run(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit_reverser", *args],
        cwd=cwd,
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replay_of_the_corpus_classifies_and_counts_every_event(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    result = run(
        "replay", "--config", str(config), *map(str, sorted(CORPUS.glob("*.jsonl"))), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    summary = dict(re.findall(r"^(\S[^:]*): (\d+)", result.stdout, re.M))
    assert summary["events read"] == "85"
    assert int(summary["kept"]) + int(summary["skipped"]) == 85
    commits = int(summary["commits"])
    assert commits > 0 and len(git_subjects(remote)) == commits
    assert "Traceback" not in result.stderr


def test_replaying_the_same_file_into_two_fresh_remotes_gives_the_same_commit_ids(
    tmp_path: Path,
) -> None:
    heads = []
    for name in ("one", "two"):
        remote = bare_repo(tmp_path / f"{name}.git")
        config = write_config(tmp_path / f"{name}.yaml", remote)
        logs = [str(f) for f in sorted(CORPUS.glob("*.jsonl"))]
        result = run(
            "replay",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / name),
            *logs,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        heads.append(git(remote, "log", "--format=%H", "main").split())
    assert heads[0] == heads[1] and len(heads[0]) > 1


def test_replay_reads_event_list_documents_from_stdin(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    document = orjson.dumps(
        event_list(event("create", body=configmap())), option=orjson.OPT_INDENT_2
    )
    result = run("replay", "--config", str(config), "-", cwd=tmp_path, stdin=document)
    assert result.returncode == 0, result.stderr
    assert git_files(remote) == ["live/v1/configmaps/default/demo.yaml"]


def _log_line(item: dict[str, object]) -> bytes:
    return orjson.dumps({"kind": "Event", "apiVersion": "audit.k8s.io/v1", **item}) + b"\n"


def test_replay_exits_non_zero_when_the_remote_is_unreachable(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    log = tmp_path / "audit.log"
    log.write_bytes(_log_line(event("create", body=configmap())))
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    assert run("replay", *state, str(log), cwd=tmp_path).returncode == 0

    log.write_bytes(_log_line(event("update", body=configmap(rv="200", data={"v": "2"}))))
    remote.rename(tmp_path / "away.git")
    result = run("replay", *state, str(log), cwd=tmp_path)
    assert result.returncode == 1
    assert "away.git" not in result.stderr and "remote.git" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1

    (tmp_path / "away.git").rename(remote)
    result = run("replay", *state, str(log), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert git_subjects(remote) == [
        "[CREATE] v1/configmaps/default/demo",
        "[UPDATE] v1/configmaps/default/demo",
    ]


def test_user_mistakes_give_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    cases = [
        (["replay", "--config", str(tmp_path / "missing.yaml"), "x.log"], 2, "no such file"),
        (["replay", "--config", str(bad), "x.log"], 2, "unknown kind v1/Pod"),
        (
            [
                "replay",
                "--config",
                str(write_config(tmp_path / "c.yaml", tmp_path / "nope.git")),
                "x.log",
            ],
            1,
            "does not exist",
        ),
    ]
    for args, code, message in cases:
        result = run(*args, cwd=tmp_path)
        assert result.returncode == code, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    good = write_config(tmp_path / "good.yaml", bare_repo(tmp_path / "r.git"))
    missing_log = run("replay", "--config", str(good), "absent.log", cwd=tmp_path)
    assert missing_log.returncode == 1
    assert missing_log.stderr.strip() == "audit-reverser: error: absent.log: no such file"


def test_serve_with_no_arguments_commits_a_posted_event_list(tmp_path: Path) -> None:
    # Exactly the README's first command, except where port 8080 is taken on this machine.
    with socket.socket() as probe:
        free = probe.connect_ex(("127.0.0.1", 8080)) != 0
    port = 8080 if free else free_port()
    args = [] if free else ["--listen", f"127.0.0.1:{port}"]
    server = subprocess.Popen(
        [sys.executable, "-m", "audit_reverser", "serve", *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "serve did not become ready"
                time.sleep(0.1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/audit-webhook",
            data=orjson.dumps(event_list(event("create", body=configmap()))),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    repo = tmp_path / "audit-repo.git"
    assert git_files(repo) == ["live-cluster/v1/configmaps/default/demo.yaml"]
    assert git_subjects(repo) == ["[CREATE] v1/configmaps/default/demo"]


def test_replay_skips_the_control_plane_unless_told_otherwise(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    log = tmp_path / "audit.log"
    controller = "system:serviceaccount:kube-system:deployment-controller"
    log.write_bytes(_log_line(event("update", body=configmap(), user=controller)))
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    result = run("replay", *state, str(log), cwd=tmp_path)
    assert result.returncode == 0 and "excluded-user: 1" in result.stdout
    assert git_files(remote) == []
    result = run("replay", *state, "--no-default-excludes", str(log), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert git_files(remote) == ["live/v1/configmaps/default/demo.yaml"]


def test_debug_logs_say_why_each_event_made_no_commit(tmp_path: Path) -> None:
    """--log-level debug: one line per skipped event, with its auditID and the reason, also
    for the events skipped on arrival (only counted otherwise)."""
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    log = tmp_path / "audit.log"
    log.write_bytes(
        _log_line(event("get", body=configmap(), audit_id="read-1"))
        + _log_line(event("create", body=configmap(), code=409, audit_id="conflict-1"))
        + _log_line(event("create", body=configmap(), audit_id="kept-1"))
    )
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    result = run("--log-level", "debug", "replay", *state, str(log), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "event 'read-1' skipped: read-verb (get '/api/v1/namespaces/default/configmaps/demo')"
        in (result.stderr)
    )
    assert re.search(
        r"event 'conflict-1' skipped: [a-z-]+ \(create '/api/v1/namespaces/default/configmaps'\)",
        result.stderr,
    )
    assert "'kept-1' skipped" not in result.stderr
    assert git_subjects(remote) == ["[CREATE] v1/configmaps/default/demo"]


def test_json_logs_name_the_event_and_the_target(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    log = tmp_path / "audit.log"
    secret = {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": "db", "namespace": "default"},
        "data": {"password": "aHVudGVyMg=="},
    }
    lines = [
        _log_line(event("create", name="a/b", body=configmap("a/b"), audit_id="forged-1")),
        _log_line(event("create", resource="secrets", name="db", body=secret, audit_id="secret-1")),
    ]
    log.write_bytes(b"".join(lines))
    state = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    result = run("--log-format", "json", "replay", *state, str(log), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [orjson.loads(line) for line in result.stderr.splitlines()]
    refused = [r for r in records if "refused" in r["message"]]
    assert refused and refused[0]["audit_id"] == "forged-1" and refused[0]["level"] == "warning"
    plaintext = [r for r in records if "never in plaintext" in r["message"]]
    assert plaintext[0]["audit_id"] == "secret-1" and plaintext[0]["target"] == "team/live"
    assert "hunter2" not in result.stderr and "aHVudGVyMg" not in result.stderr
