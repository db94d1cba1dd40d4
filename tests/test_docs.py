"""The docs match the code: every audit-reverser flag they show is one `--help` lists for
that command, every flag `--help` lists is in the README's command summary, and the
configuration reference is what the CRD schemas generate."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache

from tests.conftest import REPO_ROOT

COMMANDS = ("serve", "replay", "check", "snapshot", "webhook-config", "certs")
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"--[a-z][a-z0-9-]*")
# Flags of the other tools the docs show (kubectl, docker, kind, git, sops, kube-apiserver,
# the docs generator); anything else that looks like a flag must be one of ours.
OTHER_TOOLS = {
    "--from-file",
    "--from-literal",
    "--dry-run",
    "--as",
    "--tail",
    "--for",
    "--timeout",
    "--name",
    "--rm",
    "--user",
    "--entrypoint",
    "--format",
    "--stat",
    "--date",
    "--decrypt",
    "--encrypt",
    "--check",
    "--audit-policy-file",
    "--audit-webhook-config-file",
    "--audit-webhook-mode",
    "--audit-webhook-batch-max-size",
    "--audit-webhook-batch-max-wait",
    "--audit-webhook-batch-buffer-size",
    "--audit-webhook-initial-backoff",
}
# How the docs call audit-reverser: directly, from the image, or through a shell function.
INVOCATION = re.compile(
    r"(?:\baudit-reverser(?::dev)?|^\s*(?:run|tool)|\$\s*audit-reverser)\s+"
    rf"({'|'.join(COMMANDS)})\b([^|>;&`]*)"
)


@cache
def help_flags(command: str | None) -> frozenset[str]:
    """The flags `audit-reverser [command] --help` prints."""
    args = [command] if command else []
    done = subprocess.run(
        [sys.executable, "-m", "audit_reverser", *args, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    # Option lines only ("  --tls-cert FILE  serve HTTPS..."): help texts name other flags.
    return frozenset(re.findall(r"^ {2}(?:-\w, )?(--[a-z][a-z0-9-]*)", done.stdout, re.M))


def _code_lines(text: str) -> list[str]:
    """Shell lines of fenced blocks, continuations joined, and inline code spans."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    text = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]+)`", text)
    return lines


def test_every_command_line_in_the_docs_uses_flags_that_command_has() -> None:
    wrong = []
    seen = set()
    for path in DOCS:
        for line in _code_lines(path.read_text()):
            for command, rest in INVOCATION.findall(line):
                seen.add(command)
                known = help_flags(command) | help_flags(None)
                wrong += [
                    f"{path.name}: {command} {flag}"
                    for flag in FLAG.findall(rest)
                    if flag not in known
                ]
            # Inline mentions such as `serve --client-name`.
            mention = re.match(rf"^({'|'.join(COMMANDS)}) (--[a-z-]+)", line)
            if mention and mention[2] not in help_flags(mention[1]):
                wrong.append(f"{path.name}: {mention[1]} {mention[2]}")
    assert wrong == []
    assert seen == set(COMMANDS)  # every command is shown somewhere


def test_every_flag_in_the_docs_exists() -> None:
    ours = help_flags(None).union(*(help_flags(c) for c in COMMANDS))
    unknown = {
        f"{path.name}: {flag}"
        for path in DOCS
        for flag in FLAG.findall(path.read_text())
        if flag not in ours and flag not in OTHER_TOOLS
    }
    assert unknown == set()


def test_the_readme_summary_lists_every_flag_of_every_command() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    summary = readme.split("## Commands", 1)[1].split("```", 2)[1]
    for command in COMMANDS:
        usage = "\n".join(
            line
            for line in re.split(r"\n(?=audit-reverser )", summary)
            if line.startswith(f"audit-reverser {command} ")
        )
        missing = help_flags(command) - help_flags(None) - set(FLAG.findall(usage))
        assert missing == set(), f"{command}: {sorted(missing)}"
    first = summary.strip().splitlines()[0]  # the options every command takes
    assert help_flags(None) - {"--help", "--version"} <= set(FLAG.findall(first))


def test_the_configuration_reference_is_generated_from_the_crds() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "generate_reference.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_the_docs_link_to_files_that_exist() -> None:
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO_ROOT)} -> {target}")
    assert broken == []


def test_the_readme_links_every_doc() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    docs = {p.name for p in (REPO_ROOT / "docs").glob("*.md")}
    assert {name for name in docs if f"docs/{name}" not in readme} == set()
