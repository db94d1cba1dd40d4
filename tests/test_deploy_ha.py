"""deploy/ha/, the high-availability overlay, built as kustomize builds it (offline: its
resources, then its patches, each of which must name an object the build holds) and every
resulting manifest validated against the Kubernetes API schemas with kubernetes-validate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from audit_reverser.cli import _parser
from tests.conftest import REPO_ROOT
from tests.test_deploy import DEPLOY, NAMESPACE, documents

HA = DEPLOY / "ha"
SECRET = "audit-reverser-journal"

# Lists whose items strategic merge patches match by a key (as Kubernetes' schemas declare);
# every other list is replaced whole.
MERGE_KEYS = {"containers": "name", "volumes": "name", "volumeMounts": "mountPath"}


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic merge patch, for what deploy/ha uses: maps merged, null deletes, lists of
    containers, volumes and mounts merged by their key, other lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge(merged[key], value, key)
            else:
                merged[key] = value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = [i for i, old in enumerate(merged_list) if old[key] == item[key]]
            if at:
                merged_list[at[0]] = _merge(merged_list[at[0]], item, field)
            else:
                merged_list.append(item)
        return merged_list
    return patch


def _identity(obj: dict[str, Any]) -> tuple[str, str, str | None]:
    return obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")


def _resources(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():  # a base: itself a kustomization, built first
            # kustomize: "cycle detected: candidate root ... contains visited root ..."
            assert not folder.resolve().is_relative_to(path), f"{resource}: contains {folder}"
            objects += _build(path)
        else:
            assert path.is_relative_to(folder.resolve()), f"{resource}: outside {folder}"
            objects += documents(path)
    return objects


def _build(folder: Path) -> list[dict[str, Any]]:
    objects = _resources(folder)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    for entry in kustomization.get("patches", []):
        [patch] = documents(folder / entry["path"])
        found = [i for i, obj in enumerate(objects) if _identity(obj) == _identity(patch)]
        assert len(found) == 1, f"{entry['path']}: names no object of the build"
        if patch.pop("$patch", None) == "delete":
            del objects[found[0]]
        else:
            objects[found[0]] = _merge(objects[found[0]], patch)
    return objects


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    return _build(HA)


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_every_manifest_of_the_overlay_is_valid_kubernetes(built: list[dict[str, Any]]) -> None:
    version = latest_version()
    for obj in built:
        kubernetes_validate.validate(obj, version, strict=True)
        if (
            obj["kind"] not in ("Namespace", "CustomResourceDefinition")
            and "Cluster" not in obj["kind"]
        ):
            assert obj["metadata"]["namespace"] == NAMESPACE, _identity(obj)


def test_three_replicas_roll_spread_and_keep_two_up(built: list[dict[str, Any]]) -> None:
    deployment = _one(built, "Deployment", "audit-reverser")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    keys = set()
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
        keys.add(constraint["topologyKey"])
        if constraint["whenUnsatisfiable"] == "DoNotSchedule":
            # Tainted nodes counted with 0 replicas would block the rolling update's surge.
            assert constraint["nodeTaintsPolicy"] == "Honor"
    assert "kubernetes.io/hostname" in keys
    budget = _one(built, "PodDisruptionBudget", "audit-reverser")
    assert budget["spec"]["minAvailable"] == 2 and "maxUnavailable" not in budget["spec"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_state_is_an_empty_dir_and_the_journal_is_valkey(built: list[dict[str, Any]]) -> None:
    assert [o for o in built if o["kind"] == "PersistentVolumeClaim"] == []
    pod = _one(built, "Deployment", "audit-reverser")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["state"]) == {"name", "emptyDir"}
    assert volumes["journal"]["secret"]["secretName"] == SECRET
    [container] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes)
    args = _parser().parse_args(["serve", *container["args"]])
    assert args.journal == "redis://valkey.audit-reverser.svc:6379"
    assert str(args.journal_password_file).startswith(mounts["journal"] + "/")
    assert args.state_dir == Path(mounts["state"])
    assert args.in_cluster and args.client_name == ["kube-apiserver"]  # the base's, kept

    service = _one(built, "Service", "valkey")
    valkey = _one(built, "StatefulSet", "valkey")
    assert (
        service["spec"]["selector"].items()
        <= valkey["spec"]["template"]["metadata"]["labels"].items()
    )
    [server] = valkey["spec"]["template"]["spec"]["containers"]
    options = dict(zip(server["args"][1::2], server["args"][2::2], strict=True))
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "always"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--requirepass"] == "$(VALKEY_PASSWORD)"
    [env] = server["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "password"}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert options["--dir"] == mounts["data"]
    assert [t["metadata"]["name"] for t in valkey["spec"]["volumeClaimTemplates"]] == ["data"]


def test_the_journal_password_is_not_shipped_but_made_as_the_docs_say() -> None:
    """No password anyone could read in the repository: the Secret is made at install."""
    shipped = [o for p in HA.glob("*.yaml") for o in documents(p) if o.get("kind") == "Secret"]
    assert shipped == []
    made = f"create secret generic {SECRET}"
    assert made in (HA / "kustomization.yaml").read_text()
    assert made in (REPO_ROOT / "docs" / "ha.md").read_text()
