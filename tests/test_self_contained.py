"""A clone on its own passes its tests: everything the tests, benchmarks, docs and CI read lives
inside the repository, because a user's clone has nothing beside it."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.conftest import CORPUS, REPO_ROOT, SEED

# A path that climbs out of the checkout to a sibling folder (the shared folder by a relative
# path or by a parent of the repository's root). Built from parts so that this file does not
# match itself.
OUTSIDE = re.compile(
    "|".join(
        [
            r"\.\./" + "shared",
            r"parent\s*/\s*[\"']" + "shared",
            r"\bREPO(?:_ROOT)?\.parent\b",
        ]
    )
)
CHECKED = ("tests/", "bench/", "docs/", ".ci/", "kind/", "deploy/", "README.md", "Dockerfile")


def _tracked_text_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", *CHECKED],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name]


def test_nothing_reads_from_outside_the_repository() -> None:
    files = _tracked_text_files()
    assert "tests/conftest.py" in files, "git ls-files listed nothing: is this a clone?"
    offenders = []
    for name in files:
        try:
            text = (REPO_ROOT / name).read_text()
        except UnicodeDecodeError:
            continue
        offenders += [
            f"{name}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)
        ]
    assert offenders == []


def test_the_corpus_and_its_sources_are_in_the_repository() -> None:
    assert CORPUS.is_relative_to(REPO_ROOT) and SEED.is_relative_to(REPO_ROOT)
    sources = (CORPUS / "SOURCES.md").read_text()
    files = sorted(CORPUS.glob("*.jsonl"))
    events = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    # SOURCES.md names every file and the total it counts; the copy is whole.
    assert all(f.name in sources for f in files)
    assert f"Total events: {len(events)} in {len(files)} files." in sources
    assert len(events) == 85
    assert all(e["kind"] == "Event" and e["apiVersion"].startswith("audit.k8s.io/") for e in events)
    # The upstream licence the seed's files are copied under travels with them.
    assert "Apache License" in (SEED / "LICENSE-upstream").read_text()
    for name in ("quickstart-gitprovider.yaml", "quickstart-gittarget.yaml"):
        assert yaml.safe_load((SEED / name).read_text())["apiVersion"] == "configbutler.ai/v1alpha1"


def test_ci_runs_the_readme_test_command_in_a_lone_clone() -> None:
    script = (REPO_ROOT / ".ci" / "run").read_text()
    # .ci/run reads the command from the README (no copy that could drift): run its reading.
    reading = next(line for line in script.splitlines() if line.startswith("test_command="))
    read = subprocess.run(
        ["bash", "-c", f'{reading}\nprintf %s "$test_command"'],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert read == first_block[1]
    assert "pytest" in read
    # ... and runs it in a clone of its own in an empty folder.
    after_clone = script[script.index("git clone") :]
    assert "mktemp -d" in script[: script.index("git clone")]
    assert 'bash -euo pipefail -c "$test_command"' in after_clone
