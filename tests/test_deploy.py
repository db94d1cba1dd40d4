"""The CRDs users apply are the seed's, and the seed's samples load."""

from __future__ import annotations

from pathlib import Path

import yaml

from audit_reverser.config.loader import build_config
from tests.conftest import REPO_ROOT, SEED

CRDS = REPO_ROOT / "deploy" / "crds"


def test_the_crds_are_the_seeds_unchanged() -> None:
    shipped = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert shipped == sorted(p.name for p in SEED.glob("configbutler.ai_*.yaml"))
    for name in shipped:
        assert (CRDS / name).read_bytes() == (SEED / name).read_bytes(), name


def test_every_crd_serves_v1alpha1_with_a_status_subresource() -> None:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["group"] == "configbutler.ai"
        [version] = crd["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert "status" in version.get("subresources", {})


def test_the_seed_samples_load_as_cluster_objects() -> None:
    documents = [
        (str(path), doc)
        for path in sorted(Path(SEED).glob("*.yaml"))
        if not path.name.startswith("configbutler.ai_") and path.name != "audit-policy.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    config, problems = build_config(documents)
    assert problems == []
    assert {str(k) for k in config.targets} == {"default/example-target"}
