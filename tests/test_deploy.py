"""The CRDs users apply are the seed's, and the seed's samples load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from audit_reverser.config.loader import build_config
from tests.conftest import REPO_ROOT, SEED

CRDS = REPO_ROOT / "deploy" / "crds"


# Our one extension of the seed's schema: rule-level exclusions (optional fields, so every
# existing object stays valid).
EXTENSIONS = {
    "configbutler.ai_watchrules.yaml": ("excludeUsers", "excludeFieldManagers"),
    "configbutler.ai_clusterwatchrules.yaml": ("excludeUsers", "excludeFieldManagers"),
}


def _spec_properties(crd: dict[str, Any]) -> dict[str, Any]:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    properties: dict[str, Any] = schema["properties"]["spec"]["properties"]
    return properties


def test_the_crds_are_the_seeds_plus_only_the_documented_extensions() -> None:
    shipped = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert shipped == sorted(p.name for p in SEED.glob("configbutler.ai_*.yaml"))
    for name in shipped:
        ours = yaml.safe_load((CRDS / name).read_text())
        seed = yaml.safe_load((SEED / name).read_text())
        added = EXTENSIONS.get(name, ())
        for field in added:
            assert _spec_properties(ours).pop(field)["type"] == "array"
            assert field not in _spec_properties(seed)
        assert ours == seed, name
        assert not set(added) & set(_spec_properties(seed).get("required", ()))


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
