"""Configuration files: the seed's samples load as they are; mistakes name file, document, field."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit_reverser.config import load_config, load_default_config
from audit_reverser.config.loader import parse_duration
from audit_reverser.config.model import Key
from audit_reverser.errors import ConfigError
from tests.conftest import SEED


def test_seed_samples_load_as_they_are() -> None:
    config = load_config(
        [
            SEED / f
            for f in (
                "quickstart-gitprovider.yaml",
                "quickstart-gittarget.yaml",
                "quickstart-watchrule.yaml",
                "clusterwatchrule.yaml",
            )
        ]
    )
    provider = config.providers[Key(namespace="default", name="example-provider")]
    assert provider.url == "git@github.com:YOUR_USERNAME/my-k8s-audit.git"
    assert provider.secret_name == "git-creds"
    assert (provider.push.interval_s, provider.push.max_commits) == (5.0, 10)
    target = config.targets[Key(namespace="default", name="example-target")]
    assert (target.branch, target.path) == ("main", "live-cluster")
    assert target.encryption is not None
    assert target.encryption.recipients.generate_when_missing
    assert target.encryption.secret_name == "sops-age-key"
    [watch_rule] = config.watch_rules
    assert watch_rule.rules[0].resources == ("configmaps",)
    [cluster_rule] = config.cluster_watch_rules
    assert cluster_rule.rules[0].scope == "Cluster"


def test_a_folder_is_searched_for_yaml(tmp_path: Path) -> None:
    (tmp_path / "nested").mkdir()
    for name in ("quickstart-gitprovider.yaml", "quickstart-gittarget.yaml"):
        (tmp_path / "nested" / name).write_text((SEED / name).read_text())
    (tmp_path / "notes.txt").write_text("not config")
    config = load_config([tmp_path])
    assert len(config.providers) == len(config.targets) == 1


def test_embedded_default_writes_everything_to_a_local_repo() -> None:
    config = load_default_config()
    [provider] = config.providers.values()
    [target] = config.targets.values()
    assert (provider.url, target.branch, target.path) == (
        "./audit-repo.git",
        "main",
        "live-cluster",
    )
    [rule] = config.cluster_watch_rules
    assert {r.scope for r in rule.rules} == {"Cluster", "Namespaced"}


def test_secret_documents_stand_in_for_cluster_secrets(tmp_path: Path) -> None:
    file = tmp_path / "s.yaml"
    file.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: git-creds, namespace: ns}\n"
        "data: {username: Ym90}\nstringData: {password: hunter2}\n"
    )
    secret = load_config([file]).secrets[Key(namespace="ns", name="git-creds")]
    assert dict(secret.data) == {"username": b"bot", "password": b"hunter2"}


def _errors(tmp_path: Path, text: str) -> list[str]:
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config([file])
    return info.value.problems


PROVIDER = """\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {name: p, namespace: ns}
spec: {url: /tmp/x.git, allowedBranches: ["release-*"]}
"""


def test_errors_name_file_document_object_and_field(tmp_path: Path) -> None:
    problems = _errors(
        tmp_path,
        PROVIDER
        + """---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {name: t, namespace: ns}
spec:
  providerRef: {name: p}
  path: ../escape
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: w, namespace: ns}
spec:
  targetRef: {name: t}
  rules: [{operations: [CREATE, MUTATE], resources: ["pod*"]}]
""",
    )
    where = f"{tmp_path / 'bad.yaml'}: document"
    assert f"{where} 2 (GitTarget t): spec.branch: is required" in problems
    assert any(p.startswith(f"{where} 2 (GitTarget t): spec.path:") for p in problems)
    assert (
        f"{where} 3 (WatchRule w): spec.rules[0].operations: 'MUTATE' is not one of "
        "CREATE, UPDATE, DELETE, *"
    ) in problems
    assert any(
        p.startswith(f"{where} 3 (WatchRule w): spec.rules[0].resources: 'pod*'") for p in problems
    )


def test_branch_must_be_allowed_by_the_provider_glob(tmp_path: Path) -> None:
    target = """---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {name: t, namespace: ns}
spec: {providerRef: {name: p}, branch: BRANCH}
"""
    problems = _errors(tmp_path, PROVIDER + target.replace("BRANCH", "main"))
    assert problems == [
        "GitTarget ns/t: spec.branch: 'main' is not allowed by GitProvider ns/p "
        f"(allowedBranches: ['release-*']) (in {tmp_path / 'bad.yaml'}: document 2)"
    ]
    file = tmp_path / "ok.yaml"
    file.write_text(PROVIDER + target.replace("BRANCH", "release-1.2"))
    assert load_config([file]).targets[Key(namespace="ns", name="t")].branch == "release-1.2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            "document 1: unknown kind v1/ConfigMap",
        ),
        ("a: [unclosed\n", "invalid YAML at line 2"),
        ("- just\n- a list\n", "document 1: must be a mapping"),
        (
            PROVIDER.replace("url: /tmp/x.git, ", "url: /tmp/x.git, colour: red, "),
            "spec.colour: unknown field",
        ),
        (
            PROVIDER.replace("allowedBranches", "push: {interval: soon}, allowedBranches"),
            "spec.push.interval: 'soon' is not a duration",
        ),
        (PROVIDER + "---\n" + PROVIDER, "duplicate GitProvider ns/p"),
        (
            """apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {name: c}
spec: {targetRef: {name: t}, rules: [{resources: ["*"]}]}
""",
            "spec.targetRef.namespace: is required",
        ),
        (
            """apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {name: w, namespace: ns}
spec: {targetRef: {name: missing}, rules: [{resources: ["*"]}]}
""",
            "WatchRule ns/w: spec.targetRef.name: GitTarget ns/missing not found",
        ),
    ],
)
def test_user_mistakes_are_reported_clearly(tmp_path: Path, text: str, expected: str) -> None:
    problems = _errors(tmp_path, text)
    assert any(expected in p for p in problems), problems


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config([tmp_path / "absent.yaml"])


@pytest.mark.parametrize(
    ("text", "seconds"), [("5s", 5), ("1m", 60), ("1m30s", 90), ("500ms", 0.5), ("2h", 7200)]
)
def test_push_interval_uses_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
