"""Sanitizing keeps what users wrote; canonical YAML gives the same bytes for the same object."""

from __future__ import annotations

import random

import pytest
import yaml

from audit_reverser.errors import EventError
from audit_reverser.events import parse_event
from audit_reverser.pipeline import canonical
from audit_reverser.pipeline.sanitize import sanitize
from tests.conftest import configmap, event


def test_server_owned_fields_go_everything_else_stays() -> None:
    storage_class = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": "fast",
            "uid": "u",
            "resourceVersion": "1",
            "generation": 2,
            "creationTimestamp": "t",
            "selfLink": "/x",
            "managedFields": [],
            "ownerReferences": [{"kind": "X"}],
            "labels": {"tier": "gold"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "team": "storage",
            },
        },
        "provisioner": "ebs.csi.aws.com",
        "parameters": {"type": "gp3"},
        "reclaimPolicy": "Delete",
        "status": {"anything": True},
    }
    assert sanitize(storage_class, api_group="storage.k8s.io", resource="storageclasses") == {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": "fast",
            "labels": {"tier": "gold"},
            "annotations": {"team": "storage"},
        },
        "provisioner": "ebs.csi.aws.com",
        "parameters": {"type": "gp3"},
        "reclaimPolicy": "Delete",
    }


@pytest.mark.parametrize(
    "obj",
    [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": "p"},
            "value": 1000,
            "globalDefault": False,
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "s", "namespace": "n"},
            "automountServiceAccountToken": False,
            "imagePullSecrets": [{"name": "reg"}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "r", "namespace": "n"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
        },
    ],
)
def test_top_level_fields_of_other_kinds_are_kept(obj: dict[str, object]) -> None:
    assert sanitize(obj, api_group="", resource="x") == obj


def test_service_cluster_ip_goes_but_headless_none_stays() -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {"clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"], "ports": [{"port": 80}]},
    }
    assert sanitize(service, api_group="", resource="services")["spec"] == {"ports": [{"port": 80}]}
    headless = {**service, "spec": {"clusterIP": "None", "clusterIPs": ["None"]}}
    assert sanitize(headless, api_group="", resource="services")["spec"]["clusterIP"] == "None"


def test_job_generated_selector_goes_unless_manual() -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j"},
        "spec": {
            "selector": {"matchLabels": {"controller-uid": "u"}},
            "template": {
                "metadata": {"labels": {"controller-uid": "u", "job-name": "j", "app": "x"}}
            },
        },
    }
    clean = sanitize(job, api_group="batch", resource="jobs")
    assert "selector" not in clean["spec"]
    assert clean["spec"]["template"]["metadata"]["labels"] == {"app": "x"}
    manual = {**job, "spec": {**job["spec"], "manualSelector": True}}
    assert "selector" in sanitize(manual, api_group="batch", resource="jobs")["spec"]


def test_sanitize_does_not_touch_the_event() -> None:
    body = configmap()
    sanitize(body, api_group="", resource="configmaps")
    assert "uid" in body["metadata"]


def test_canonical_yaml_is_stable_ordered_and_readable() -> None:
    obj = {
        "data": {"script.sh": "#!/bin/sh\necho hi\n", "yes": "on", "n": "0123"},
        "metadata": {"labels": {"b": "2", "a": "1"}, "namespace": "ns", "name": "x"},
        "kind": "ConfigMap",
        "apiVersion": "v1",
    }
    text = canonical.dump(obj).decode()
    assert text == (
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: x\n"
        "  namespace: ns\n"
        "  labels:\n"
        "    a: '1'\n"
        "    b: '2'\n"
        "data:\n"
        "  n: '0123'\n"
        "  script.sh: |\n"
        "    #!/bin/sh\n"
        "    echo hi\n"
        "  'yes': 'on'\n"
    )
    assert yaml.safe_load(text) == obj


def test_canonical_yaml_does_not_depend_on_key_order() -> None:
    obj = configmap(data={f"k{i}": str(i) for i in range(50)}, labels={"x": "1", "y": "2"})
    shuffled = dict(random.Random(7).sample(list(obj.items()), len(obj)))
    assert canonical.dump(obj) == canonical.dump(shuffled)


def test_shared_values_are_written_out_not_aliased() -> None:
    shared = {"cpu": "1"}
    text = canonical.dump({"apiVersion": "v1", "kind": "X", "a": shared, "b": shared}).decode()
    assert "&" not in text and "*" not in text


def test_event_parsing_reports_the_audit_id_and_field() -> None:
    broken = event("create", body=configmap())
    broken["sourceIPs"] = "10.0.0.1"
    with pytest.raises(EventError, match=r"event .*: field 'sourceIPs' must be a list"):
        parse_event(broken)
    with pytest.raises(EventError, match="no auditID"):
        parse_event({"verb": "create"})
    with pytest.raises(EventError, match="kind must be 'Event'"):
        parse_event({**broken, "kind": "Pod", "sourceIPs": []})


def test_a_user_or_object_reference_seen_before_does_not_let_a_broken_one_through() -> None:
    good = event("update", name="demo", body=configmap())
    parsed = parse_event(good)
    assert parsed.user.username and parsed.object_ref is not None
    assert parsed.object_ref.name == "demo"
    broken_user = {**good, "user": {**good["user"], "groups": [1]}}
    with pytest.raises(EventError, match="user: field 'groups' must be a list of strings"):
        parse_event(broken_user)
    broken_user = {**good, "user": {**good["user"], "username": ["x"]}}
    with pytest.raises(EventError, match="user: field 'username' must be a string"):
        parse_event(broken_user)
    broken_ref = {**good, "objectRef": {**good["objectRef"], "name": 7}}
    with pytest.raises(EventError, match="objectRef: field 'name' must be a string"):
        parse_event(broken_ref)
    broken_ref = {**good, "objectRef": {**good["objectRef"], "namespace": ["default"]}}
    with pytest.raises(EventError, match="objectRef: field 'namespace' must be a string"):
        parse_event(broken_ref)
    assert parse_event(good) == parsed


def test_events_from_v1beta1_logs_parse() -> None:
    item = {
        **event("create", body=configmap()),
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1beta1",
    }
    parsed = parse_event(item)
    assert parsed.object_ref is not None and parsed.object_ref.name == "demo"
    assert parsed.time is not None and parsed.time.year == 2026
