"""The CRDs users apply are the seed's, and the seed's samples load."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import yaml

from audit_reverser.config.loader import build_config
from tests.conftest import REPO_ROOT, SEED
from tests.rbac import Authorizer, request_attributes

CRDS = REPO_ROOT / "deploy" / "base" / "crds"


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


# --- the install manifests (deploy/) ------------------------------------------------------

DEPLOY = REPO_ROOT / "deploy"
BASE = DEPLOY / "base"  # the resources; deploy/ and deploy/ha/ build on them
NAMESPACE = "audit-reverser"
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ClusterWatchRule",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rbac_documents() -> list[dict[str, Any]]:
    """The roles and bindings a user applies: the install's, and the example RoleBinding for
    generated keys in namespace default."""
    return documents(BASE / "rbac.yaml") + documents(DEPLOY / "examples/keys-rolebinding.yaml")


def _kustomization_objects(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        assert path.is_relative_to(folder.resolve()) or (
            path.is_dir() and not folder.resolve().is_relative_to(path)  # a base, not a parent
        ), f"{resource}: kustomize refuses files outside its folder, and a base around it"
        objects += documents(path) if path.is_file() else _kustomization_objects(path)
    return objects


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


def test_kustomize_installs_every_manifest_in_the_folder_and_each_is_well_formed() -> None:
    assert yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"] == ["base"]
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = {str(Path(r)) for r in kustomization["resources"]}
    present = {str(p.relative_to(BASE)) for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    present |= {str(p.relative_to(BASE)) for p in (BASE / "crds").glob("*.yaml")}
    assert listed == present
    objects = _kustomization_objects(DEPLOY)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["CustomResourceDefinition"] * 4
        + ["Namespace", "ServiceAccount", "PersistentVolumeClaim", "Deployment", "Service"]
        + ["PodDisruptionBudget", "ClusterRole", "ClusterRole", "ClusterRole"]
        + ["ClusterRoleBinding", "ClusterRoleBinding"]
    )
    for obj in objects:
        assert obj["apiVersion"] and obj["metadata"]["name"], obj
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj["metadata"]
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]


def test_the_deployment_runs_serve_hardened_with_its_volumes_probes_and_limits() -> None:
    from audit_reverser.cli import _parser

    objects = _kustomization_objects(DEPLOY)
    deployment = _one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # The arguments are serve's (the image's entrypoint) and its parser takes them.
    args = _parser().parse_args(["serve", *container["args"]])
    assert args.in_cluster and not args.config and not args.insecure
    assert args.client_ca and args.client_name == ["kube-apiserver"]
    assert args.listen == ("0.0.0.0", container["ports"][0]["containerPort"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) == set(volumes)
    for path in (args.state_dir, args.tls_cert, args.tls_key, args.client_ca):
        assert any(Path(path).is_relative_to(m) for m in mounts), path
    # State outlives the pod; the root filesystem is read-only, /tmp is a volume.
    claim = volumes[mounts[str(args.state_dir)]]["persistentVolumeClaim"]["claimName"]
    assert claim == _one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce state
    assert "/tmp" in mounts
    # Non-root, no privileges, and what the image's USER is.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(_dockerfile_final_stage()["USER"][0])
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    hardening = container["securityContext"]
    assert hardening["readOnlyRootFilesystem"] is True
    assert hardening["allowPrivilegeEscalation"] is False
    assert hardening["capabilities"]["drop"] == ["ALL"]
    assert pod["serviceAccountName"] == _one(objects, "ServiceAccount")["metadata"]["name"]
    # Probes ask the endpoints serve has, over the port it listens on.
    port_names = {p["name"] for p in container["ports"]}
    probes = {name: container[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert all(p["port"] in port_names and p["scheme"] == "HTTPS" for p in probes.values())
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # SIGTERM commits and pushes within --shutdown-timeout: the grace period is longer.
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_timeout
    # The image is the one kustomize sets.
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert container["image"] == kustomization["images"][0]["name"]


def test_the_service_and_the_budget_select_the_pod() -> None:
    objects = _kustomization_objects(DEPLOY)
    pod = _one(objects, "Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    service = _one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    budget = _one(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # One replica: a budget of minAvailable 1 would block every node drain.
    assert budget["spec"] == {**budget["spec"], "maxUnavailable": 1}


def test_rbac_bindings_name_roles_and_the_service_account_that_exist() -> None:
    objects = _kustomization_objects(DEPLOY) + documents(DEPLOY / "examples/keys-rolebinding.yaml")
    roles = {o["metadata"]["name"] for o in objects if o["kind"] == "ClusterRole"}
    account = _one(objects, "ServiceAccount")["metadata"]
    for binding in (o for o in objects if o["kind"].endswith("Binding")):
        assert binding["roleRef"]["name"] in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]
    # Writes: only our kinds' status, and Secrets only where a RoleBinding says so.
    for role in (o for o in objects if o["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            written = set(rule["verbs"]) - {"get", "list", "watch"}
            if written and role["metadata"]["name"] != "audit-reverser-keys":
                assert rule["apiGroups"] == ["configbutler.ai"] and all(
                    r.endswith("/status") for r in rule["resources"]
                ), rule
    assert not any(
        o["kind"] == "ClusterRoleBinding" and o["roleRef"]["name"] == "audit-reverser-keys"
        for o in objects
    )


def test_rbac_allows_what_audit_reverser_asks_and_refuses_other_writes() -> None:
    """The requests the code makes are checked in every cluster test (test_cluster.py); here,
    the other side: what it must not be able to do."""
    authorizer = Authorizer((NAMESPACE, NAMESPACE), rbac_documents())

    def allowed(method: str, path: str, **query: str) -> bool:
        return authorizer.allows(request_attributes(method, path, query))

    assert allowed("GET", "/apis/configbutler.ai/v1alpha1/gittargets", watch="true")
    assert allowed("PATCH", "/apis/configbutler.ai/v1alpha1/namespaces/a/gittargets/t/status")
    assert allowed("GET", "/apis/example.com/v1/namespaces/a/widgets/w")
    assert allowed("GET", "/apis/source.toolkit.fluxcd.io/v1/gitrepositories", watch="true")
    assert not allowed("PATCH", "/apis/source.toolkit.fluxcd.io/v1/namespaces/a/gitrepositories/g")
    assert allowed("POST", "/api/v1/namespaces/default/secrets")
    assert not allowed("POST", "/api/v1/namespaces/kube-system/secrets")
    assert not allowed("PATCH", "/api/v1/namespaces/team/secrets/sops-age-key")
    assert not allowed("PATCH", "/apis/configbutler.ai/v1alpha1/namespaces/a/gittargets/t")
    assert not allowed("DELETE", "/api/v1/namespaces/a/configmaps/c")
    assert not allowed("GET", "/api/v1/configmaps", watch="true")
    assert not allowed("POST", "/api/v1/namespaces/a/pods/p/exec")


def test_the_examples_load_as_the_rules_they_show() -> None:
    examples = DEPLOY / "examples"
    for path in examples.glob("*.yaml"):
        for doc in documents(path):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
    quickstart = [
        (str(path), doc)
        for name in ("quickstart.yaml", "git-credentials.yaml")
        for path in [examples / name]
        for doc in documents(path)
    ]
    config, problems = build_config(quickstart)
    assert problems == []
    assert {str(k) for k in config.targets} == {"default/example-target"}
    assert len(config.watch_rules) == len(config.cluster_watch_rules) == 1
    [configmap] = documents(examples / "rules-configmap.yaml")
    rules = list(yaml.safe_load_all(configmap["data"]["rules.yaml"]))
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "git-creds", "namespace": NAMESPACE},
        "stringData": {"username": "audit-reverser", "password": "x"},
    }
    config, problems = build_config([("rules.yaml", d) for d in [*rules, secret]])
    assert problems == [] and len(config.targets) == 1


def test_the_service_monitor_scrapes_the_service_over_its_tls() -> None:
    [monitor] = documents(DEPLOY / "examples" / "servicemonitor.yaml")
    objects = _kustomization_objects(DEPLOY)
    service = _one(objects, "Service")
    # kustomize's `labels` put app.kubernetes.io/name on every object it installs.
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    labels = {**service["metadata"].get("labels", {}), **kustomization["labels"][0]["pairs"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["path"], endpoint["scheme"]) == ("/metrics", "https")
    certificates = documents(DEPLOY / "cert-manager" / "certificates.yaml")
    serving = next(c for c in certificates if c["metadata"]["name"] == "audit-reverser-tls")
    assert endpoint["tlsConfig"]["serverName"] in serving["spec"]["dnsNames"]
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == serving["spec"]["secretName"]


def test_cert_manager_issues_the_secrets_the_deployment_mounts() -> None:
    folder = DEPLOY / "cert-manager"
    objects = _kustomization_objects(folder)
    issuers = {o["metadata"]["name"] for o in objects if o["kind"] == "Issuer"}
    certificates = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Certificate"}
    assert all(spec["issuerRef"]["name"] in issuers for spec in certificates.values())
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in objects)
    deployment = _one(_kustomization_objects(DEPLOY), "Deployment")["spec"]["template"]["spec"]
    [tls] = [v for v in deployment["volumes"] if "secret" in v]
    serving = certificates["audit-reverser-tls"]
    assert serving["secretName"] == tls["secret"]["secretName"]
    assert "server auth" in serving["usages"]
    assert "audit-reverser.audit-reverser.svc" in serving["dnsNames"]
    client = certificates["audit-reverser-apiserver-client"]
    assert "client auth" in client["usages"]
    assert f"--client-name={client['commonName']}" in deployment["containers"][0]["args"]
    # Both are signed by the CA whose ca.crt lands beside tls.crt: what --client-ca trusts.
    ca_issuer = next(o for o in objects if o["kind"] == "Issuer" and "ca" in o["spec"])
    assert serving["issuerRef"]["name"] == client["issuerRef"]["name"]
    assert serving["issuerRef"]["name"] == ca_issuer["metadata"]["name"]
    assert certificates["audit-reverser-ca"]["isCA"] is True


# --- the image (Dockerfile) ---------------------------------------------------------------


def _dockerfile_stages() -> list[dict[str, list[str]]]:
    """Each stage's instructions as .ci/dockerfile-steps reads them, FROM's ARGs resolved."""
    parse = runpy.run_path(str(REPO_ROOT / ".ci" / "dockerfile-steps"))["parse"]
    arguments, stages = parse((REPO_ROOT / "Dockerfile").read_text())
    result: list[dict[str, list[str]]] = []
    for steps in stages:
        stage: dict[str, list[str]] = {}
        for instruction, rest in steps:
            if instruction == "FROM":
                for name, value in arguments.items():
                    rest = rest.replace(f"${{{name}}}", value)
            stage.setdefault(instruction, []).append(rest)
        result.append(stage)
    return result


def _dockerfile_final_stage() -> dict[str, list[str]]:
    return _dockerfile_stages()[-1]


def test_the_image_is_multi_stage_non_root_and_runs_serve() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    base = final["FROM"][0]
    assert base.startswith("python:3.") and "-slim" in base
    # Built elsewhere, installed here from wheels only: no compiler reaches the final image.
    # The one system package is OpenSSH's client (SSH pushes of our own packs).
    runs = final.get("RUN", [])
    assert not any(tool in run for run in runs for tool in ("gcc", "g++", "build-essential"))
    installs = [p.split() for run in runs for p in run.split("&&") if "apt-get install" in p]
    assert installs == [["apt-get", "install", "-y", "--no-install-recommends", "openssh-client"]]
    assert any("rm -rf /var/lib/apt/lists/*" in run for run in runs)
    assert any("--no-index" in run for run in final["RUN"])
    user = final["USER"][0]
    assert user.isdecimal() and int(user) != 0  # numeric: runAsNonRoot can check it
    assert json.loads(final["ENTRYPOINT"][0])[:2] == ["audit-reverser", "serve"]
    assert json.loads(final["VOLUME"][0]) == ["/state"]
    # A volume Docker makes for /state takes the folder's owner: the user must own it.
    assert any(f"chown {user}:{user} /state" in run for run in final["RUN"])
    assert "--state-dir" in json.loads(final["CMD"][0])
    labels = " ".join(final["LABEL"])
    for label in ("title", "description", "licenses", "version"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_every_manifest_and_policy_file_is_one_the_tests_check() -> None:
    """A new file in deploy/, kind/ or policy/ needs a test of its own: add it here with one."""
    checked = {
        "deploy/kustomization.yaml",  # the base, as one install
        *(f"deploy/base/{p.name}" for p in BASE.glob("*.yaml")),  # through its kustomization
        *(f"deploy/base/crds/{p.name}" for p in (BASE / "crds").glob("*.yaml")),
        "deploy/examples/keys-rolebinding.yaml",  # RBAC tests, every cluster test
        "deploy/examples/git-credentials.yaml",  # loads with the quickstart
        "deploy/examples/quickstart.yaml",
        "deploy/examples/rules-configmap.yaml",
        "deploy/examples/age-key.yaml",  # shape only: it holds a placeholder
        "deploy/examples/servicemonitor.yaml",
        "deploy/cert-manager/kustomization.yaml",
        "deploy/cert-manager/certificates.yaml",
        "deploy/monitoring/alerts.yaml",  # tests/test_metrics.py, with the dashboard
        "deploy/ha/kustomization.yaml",  # tests/test_deploy_ha.py
        "deploy/ha/deployment.yaml",
        "deploy/ha/pdb.yaml",
        "deploy/ha/no-state-volume.yaml",
        "deploy/ha/valkey.yaml",
        "kind/cluster.yaml",  # tests/test_kind.py
        "kind/kustomization.yaml",
        "kind/quickstart.yaml",
        "policy/recommended.yaml",  # tests/test_policy.py
        "policy/minimal.yaml",
    }
    present = {
        str(p.relative_to(REPO_ROOT))
        for folder in ("deploy", "kind", "policy")
        for p in (REPO_ROOT / folder).rglob("*.yaml")
        if ".work" not in p.parts
    }
    assert present == checked
