"""Spellings of one repository share one writer; local paths are told apart from remotes."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit_reverser.errors import RepositoryError
from audit_reverser.gitstore.transport import (
    local_path,
    mirror_name,
    remote_key,
    scrub,
    transport_for,
)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("git@github.com:Owner/repo.git", "ssh://git@GitHub.com/Owner/repo"),
        ("https://gitlab.example.com/group/repo.git", "https://GITLAB.example.com/group/repo/"),
        ("/srv/git/repo.git", "file:///srv/git/repo.git"),
        ("/srv/git/repo.git", "/srv/git/../git/repo.git/"),
    ],
)
def test_spellings_of_one_repository_have_one_key(a: str, b: str) -> None:
    assert remote_key(a) == remote_key(b)
    assert mirror_name(a, "main") == mirror_name(b, "main")


def test_different_branches_and_repositories_get_different_mirrors() -> None:
    assert mirror_name("/r.git", "main") != mirror_name("/r.git", "dev")
    assert remote_key("https://h/a/repo") != remote_key("https://h/b/repo")


def test_local_paths_are_recognised(tmp_path: Path) -> None:
    assert local_path(f"file://{tmp_path}/r.git") == tmp_path / "r.git"
    assert local_path("./r.git") == Path.cwd() / "r.git"
    assert local_path("git@github.com:o/r.git") is None
    assert local_path("https://github.com/o/r.git") is None


def test_an_unsupported_scheme_fails_with_a_clear_message() -> None:
    with pytest.raises(RepositoryError, match="unsupported URL scheme 'ftp'"):
        transport_for("ftp://host/r.git")


def test_credentials_in_an_https_url_are_taken_out_of_it() -> None:
    transport = transport_for("https://bot:t0ken@Git.Example.com:8443/o/r.git")
    assert transport.url == transport.display == "https://git.example.com:8443/o/r.git"
    assert "t0ken" not in transport.url


def test_scrub_removes_user_information_from_urls_in_messages() -> None:
    text = "could not read from https://bot:t0ken@host/r.git and ssh://git@host/r"
    assert scrub(text) == "could not read from https://host/r.git and ssh://host/r"
