"""Deletions finished by the control plane reach Git, in the name of whoever asked.

A day in a cluster, as the apiserver audits it (level RequestResponse): a PVC released by
the pvc-protection controller, a namespace emptied by the namespace controller, a CRD
removed with its instances by the apiserver, the garbage collector's cascade after a
Deployment is deleted, and a finished Job deleted by the TTL controller. Everything is read
back from the bare remote with plain git.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from audit_reverser.cluster.objects import ApiObjects
from audit_reverser.config import load_config
from audit_reverser.events import AuditEvent, parse_event
from audit_reverser.pipeline.deletions import KEPT_AGE_S, Deletions
from audit_reverser.pipeline.filter import Skip
from audit_reverser.runtime import Runtime, Settings
from tests.conftest import (
    Harness,
    bare_repo,
    configmap,
    event,
    event_list,
    git,
    git_files,
    request,
    start_harness,
    start_serve,
    write_config,
)
from tests.test_cluster import Cluster, cluster

__all__ = ["cluster"]  # the fixture, shared with test_cluster

KCM = "kube-controller-manager/v1.31.0 (linux/amd64) kubernetes/9edcffc"
PVC_PROTECTION = "system:serviceaccount:kube-system:pvc-protection-controller"
NAMESPACE_CONTROLLER = "system:serviceaccount:kube-system:namespace-controller"
GARBAGE_COLLECTOR = "system:serviceaccount:kube-system:generic-garbage-collector"
TTL_CONTROLLER = "system:serviceaccount:kube-system:ttl-after-finished-controller"
DELETED_AT = "2026-01-02T04:00:00Z"


def by_controller(item: dict[str, Any], user: str) -> dict[str, Any]:
    """``item`` as sent by a kube-controller-manager controller under its service account."""
    item["user"] = {
        "username": user,
        "uid": "5b2f7d3a-0c55-4a43-a1d7-8f6b5e1f0c3e",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system"],
    }
    item["userAgent"] = f"{KCM}/{user.rpartition(':')[2]}"
    item["sourceIPs"] = ["172.18.0.2"]
    return item


def by_apiserver(item: dict[str, Any]) -> dict[str, Any]:
    item["user"] = {"username": "system:apiserver", "groups": ["system:masters"]}
    item["userAgent"] = "kube-apiserver/v1.31.0 (linux/amd64) kubernetes/9edcffc"
    item["sourceIPs"] = ["::1"]
    return item


def deleted(obj: dict[str, Any], rv: str, *, finalizers: list[str] | None) -> dict[str, Any]:
    """``obj`` as a write answers once its deletion was asked for."""
    changed = copy.deepcopy(obj)
    metadata = changed["metadata"]
    metadata.update(resourceVersion=rv, deletionTimestamp=DELETED_AT, deletionGracePeriodSeconds=0)
    if finalizers:
        metadata["finalizers"] = finalizers
    else:
        metadata.pop("finalizers", None)
    return changed


def success(name: str, kind: str, uid: str, group: str = "") -> dict[str, Any]:
    """The Status a delete answers when the object is gone at once."""
    details = {"name": name, "kind": kind, "uid": uid} | ({"group": group} if group else {})
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }


async def commits(harness: Harness) -> list[dict[str, str]]:
    """Every commit, oldest first: subject, author, trailers (the last of each key) and the
    files it removed."""
    found = []
    for entry in await harness.log("%H%x1f%s%x1f%an <%ae>%x1f%b"):
        commit, subject, author, body = entry.split("\x1f")
        info = {"subject": subject, "author": author}
        for line in body.splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                info[key] = value
        removed = await asyncio.to_thread(
            git, harness.remote, "show", "--diff-filter=D", "--name-only", "--format=", commit
        )
        info["removed"] = " ".join(sorted(removed.split()))
        found.append(info)
    return found


def pvc(rv: str, finalizers: list[str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": "data",
        "namespace": "shop",
        "uid": "0f7e1d2c-3b4a-4958-8776-a5b4c3d2e1f0",
        "resourceVersion": rv,
        "creationTimestamp": "2026-01-02T03:04:05Z",
    }
    if finalizers:
        metadata["finalizers"] = finalizers
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        "status": {"phase": "Bound"},
    }


PVC_FILE = "live/v1/persistentvolumeclaims/shop/data.yaml"


def _pvc_event(verb: str, body: dict[str, Any], **options: Any) -> dict[str, Any]:
    return event(
        verb, resource="persistentvolumeclaims", namespace="shop", name="data", body=body, **options
    )


async def test_a_pvc_released_by_the_pvc_protection_controller_leaves_git_in_the_users_name(
    harness: Harness,
) -> None:
    protected = pvc("200", ["kubernetes.io/pvc-protection"])
    await harness.send(_pvc_event("create", protected, user="alice@example.com"))
    # The controller's own bookkeeping (it re-adds what it already has): no commit.
    await harness.send(
        by_controller(
            _pvc_event("update", pvc("201", ["kubernetes.io/pvc-protection"])), PVC_PROTECTION
        )
    )
    await harness.sync()
    assert await harness.files() == [PVC_FILE]

    # The request and its completion arrive in one EventList.
    asked = deleted(pvc("202"), "202", finalizers=["kubernetes.io/pvc-protection"])
    released = deleted(pvc("203"), "203", finalizers=None)
    await harness.send(
        _pvc_event("delete", asked, user="bob@example.com", audit_id="bob-deletes-pvc"),
        by_controller(
            _pvc_event("update", released, audit_id="controller-releases"), PVC_PROTECTION
        ),
    )
    await harness.sync()

    assert await harness.files() == []
    assert harness.runtime.stats.skipped[Skip.EXCLUDED_USER] == 1
    *_, last = await commits(harness)
    assert last["subject"] == "[DELETE] v1/persistentvolumeclaims/shop/data"
    assert last["author"] == "bob@example.com <bob@example.com>"
    assert last["User"] == "bob@example.com"
    assert last["Deleted-By"] == PVC_PROTECTION
    assert last["Delete-Audit-ID"] == "bob-deletes-pvc"
    assert last["Audit-ID"] == "controller-releases" and last["Verb"] == "update"
    assert last["removed"] == PVC_FILE


def _post(port: int, *items: dict[str, Any]) -> None:
    status, body = request(port, "POST", "/audit-webhook", orjson.dumps(event_list(*items)))
    assert status == 200, body


def _wait_until_done(state: Path, records: int) -> None:
    """Until the journal says ``records`` records are committed: a kill -9 from then on does
    not send them through the pipeline again (their memories must be elsewhere)."""
    checkpoint = state / "journal" / "checkpoint.json"
    deadline = time.monotonic() + 120  # a bound against hangs, not a time to meet
    while not (checkpoint.exists() and orjson.loads(checkpoint.read_bytes())["done"] >= records):
        assert time.monotonic() < deadline, "the journal never counted the records as done"
        time.sleep(0.05)


def test_a_restart_between_a_delete_and_its_completion_keeps_the_requester(
    tmp_path: Path,
) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote, max_commits=1, interval="100ms")
    args = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    server = start_serve(tmp_path, *args)
    protected = pvc("200", ["kubernetes.io/pvc-protection"])
    asked = deleted(pvc("202"), "202", finalizers=["kubernetes.io/pvc-protection"])
    _post(
        server.port,
        _pvc_event("create", protected, user="alice@example.com"),
        _pvc_event("delete", asked, user="bob@example.com", audit_id="bob-deletes-pvc"),
    )
    _wait_until_done(tmp_path / "state", 2)
    server.kill()  # no clean-up: what is not on disk now is lost

    server = start_serve(tmp_path, *args)
    released = deleted(pvc("203"), "203", finalizers=None)
    _post(
        server.port,
        by_controller(
            _pvc_event("update", released, audit_id="controller-releases"), PVC_PROTECTION
        ),
    )
    log = server.stop()
    assert server.process.returncode == 0, log

    assert git_files(remote) == []
    message = git(remote, "log", "-1", "--format=%an <%ae>%n%B", "main")
    assert message.startswith("bob@example.com <bob@example.com>\n[DELETE] v1/persistent")
    assert f"Deleted-By: {PVC_PROTECTION}\n" in message
    assert "Delete-Audit-ID: bob-deletes-pvc\n" in message


def namespace(
    rv: str, *, terminating: bool = False, finalizers: tuple[str, ...] = ("kubernetes",)
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": "shop",
        "uid": "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a",
        "resourceVersion": rv,
    }
    if terminating:
        metadata["deletionTimestamp"] = DELETED_AT
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": metadata,
        "spec": {"finalizers": list(finalizers)} if finalizers else {},
        "status": {"phase": "Terminating" if terminating else "Active"},
    }


def deployment(name: str, namespace: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "310",
            "generation": 1,
        },
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}},
    }


def widget(name: str, namespace: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": f"example.com/{version}",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "320"},
        "spec": {"size": 3},
    }


def partial_metadata_list(*items: dict[str, Any]) -> dict[str, Any]:
    """What a deletecollection through the metadata client (the namespace controller's)
    answers: the deleted objects' metadata only."""
    return {
        "kind": "PartialObjectMetadataList",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": "400"},
        "items": [
            {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": item["metadata"],
            }
            for item in items
        ],
    }


async def test_a_namespace_deleted_by_a_user_is_emptied_in_git_by_the_namespace_controller(
    harness: Harness,
) -> None:
    web = deployment("web", "shop", "1a2b3c4d-0000-4000-8000-000000000001")
    await harness.send(
        event(
            "create", resource="namespaces", namespace="shop", name="shop", body=namespace("300")
        ),
        event("create", namespace="shop", name="settings", body=configmap("settings", "shop")),
        event(
            "create", group="apps", resource="deployments", namespace="shop", name="web", body=web
        ),
        event(
            "create",
            group="example.com",
            resource="widgets",
            namespace="shop",
            name="w1",
            body=widget("w1", "shop", "v1"),
        ),
        event("create", namespace="default", name="elsewhere", body=configmap("elsewhere")),
    )
    await harness.sync()
    assert len(await harness.files()) == 5

    ns = {"resource": "namespaces", "namespace": "shop", "name": "shop"}
    await harness.send(
        event(
            "delete",
            **ns,
            body=namespace("401", terminating=True),
            user="carol@example.com",
            audit_id="carol-deletes-shop",
        ),
        # What the namespace controller sends: a deletecollection per resource in the namespace...
        by_controller(
            event(
                "deletecollection",
                namespace="shop",
                name=None,
                body=partial_metadata_list(configmap("settings", "shop")),
            ),
            NAMESPACE_CONTROLLER,
        ),
        by_controller(
            event(
                "deletecollection",
                group="apps",
                resource="deployments",
                namespace="shop",
                name=None,
                body=partial_metadata_list(web),
            ),
            NAMESPACE_CONTROLLER,
        ),
        # (the widgets' deletecollection was audited without its list: it tells nothing here)
        by_controller(
            event(
                "deletecollection",
                group="example.com",
                resource="widgets",
                namespace="shop",
                name=None,
                level="Metadata",
            ),
            NAMESPACE_CONTROLLER,
        ),
        # ...then the finalize that empties spec.finalizers: the apiserver deletes it then.
        by_controller(
            event(
                "update",
                **ns,
                subresource="finalize",
                body=namespace("402", terminating=True, finalizers=()),
                audit_id="finalized",
            ),
            NAMESPACE_CONTROLLER,
        ),
    )
    await harness.sync()

    assert await harness.files() == ["live/v1/configmaps/default/elsewhere.yaml"]
    deletions = [c for c in await commits(harness) if c["subject"].startswith("[DELETE]")]
    assert [c["subject"] for c in deletions] == [
        "[DELETE] v1/configmaps/shop/settings",
        "[DELETE] apps/v1/deployments/shop/web",
        "[DELETE] v1/namespaces/shop",
    ]
    for commit in deletions:
        assert commit["author"] == "carol@example.com <carol@example.com>"
        assert commit["Deleted-By"] == NAMESPACE_CONTROLLER
        assert commit["Delete-Audit-ID"] == "carol-deletes-shop"
    # The namespace's own commit takes what is left of it (the widget) along.
    assert deletions[-1]["removed"] == (
        "live/example.com/v1/widgets/shop/w1.yaml live/v1/namespaces/shop.yaml"
    )
    assert deletions[-1]["Audit-ID"] == "finalized"


def crd(rv: str, finalizers: list[str] | None = None, terminating: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": "widgets.example.com",
        "uid": "c0ffee00-0000-4000-8000-000000000042",
        "resourceVersion": rv,
        "generation": 1,
    }
    if terminating:
        metadata["deletionTimestamp"] = DELETED_AT
    if finalizers:
        metadata["finalizers"] = finalizers
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": metadata,
        "spec": {
            "group": "example.com",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                },
                {
                    "name": "v1beta1",
                    "served": True,
                    "storage": False,
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                },
            ],
        },
    }


async def test_a_crd_removed_takes_every_file_of_its_resource_in_one_commit(
    harness: Harness,
) -> None:
    crd_ref = {
        "group": "apiextensions.k8s.io",
        "resource": "customresourcedefinitions",
        "namespace": None,
        "name": "widgets.example.com",
    }
    gadget = {**widget("g1", "default", "v1"), "kind": "Gadget"}
    await harness.send(
        event("create", **crd_ref, body=crd("500")),
        event(
            "create",
            group="example.com",
            resource="widgets",
            name="w1",
            body=widget("w1", "default", "v1"),
        ),
        event(
            "create",
            group="example.com",
            resource="widgets",
            version="v1beta1",
            namespace="team",
            name="w2",
            body=widget("w2", "team", "v1beta1"),
        ),
        event("create", group="example.com", resource="gadgets", name="g1", body=gadget),
    )
    await harness.sync()
    cleanup = ["customresourcecleanup.apiextensions.k8s.io"]
    await harness.send(
        event(
            "delete", **crd_ref, body=crd("501", cleanup, terminating=True), user="dave@example.com"
        ),
        # The apiserver deletes the instances in storage (no events), then releases the CRD
        # through its status subresource.
        by_apiserver(
            event("update", **crd_ref, subresource="status", body=crd("502", terminating=True))
        ),
    )
    await harness.sync()

    assert await harness.files() == ["live/example.com/v1/gadgets/default/g1.yaml"]
    last = (await commits(harness))[-1]
    assert (
        last["subject"]
        == "[DELETE] apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com"
    )
    assert last["author"] == "dave@example.com <dave@example.com>"
    assert last["Deleted-By"] == "system:apiserver"
    assert last["removed"] == " ".join(
        [
            "live/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com.yaml",
            "live/example.com/v1/widgets/default/w1.yaml",
            "live/example.com/v1beta1/widgets/team/w2.yaml",
        ]
    )


async def test_the_garbage_collectors_cascade_is_the_owners_deleters(harness: Harness) -> None:
    owner_uid = "1a2b3c4d-0000-4000-8000-0000000000aa"
    owned = configmap(
        "web-config",
        ownerReferences=[
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "web",
                "uid": owner_uid,
                "blockOwnerDeletion": True,
            }
        ],
        uid="5e6f7a8b-0000-4000-8000-0000000000bb",
    )
    await harness.send(
        event(
            "create",
            group="apps",
            resource="deployments",
            name="web",
            body=deployment("web", "default", owner_uid),
        ),
        event("create", name="web-config", body=owned),
        event("create", name="unrelated", body=configmap("unrelated")),
    )
    await harness.sync()
    await harness.send(
        # kubectl delete deployment web: gone at once, the Status names its uid.
        event(
            "delete",
            group="apps",
            resource="deployments",
            name="web",
            body=success("web", "deployments", owner_uid, "apps"),
            user="erin@example.com",
        ),
        by_controller(
            event(
                "delete",
                name="web-config",
                request={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "preconditions": {"uid": owned["metadata"]["uid"]},
                    "propagationPolicy": "Background",
                },
                body=success("web-config", "configmaps", owned["metadata"]["uid"]),
            ),
            GARBAGE_COLLECTOR,
        ),
        # A control-plane delete of something nobody asked for is its own.
        by_controller(
            event("delete", name="unrelated", body=success("unrelated", "configmaps", "x")),
            GARBAGE_COLLECTOR,
        ),
    )
    await harness.sync()

    assert await harness.files() == []
    *_, web, config, unrelated = await commits(harness)
    assert web["subject"] == "[DELETE] apps/v1/deployments/default/web"
    assert web["author"] == "erin@example.com <erin@example.com>" and "Deleted-By" not in web
    assert config["subject"] == "[DELETE] v1/configmaps/default/web-config"
    assert config["author"] == "erin@example.com <erin@example.com>"
    assert config["Deleted-By"] == GARBAGE_COLLECTOR
    assert unrelated["author"].startswith(f"{GARBAGE_COLLECTOR} <")
    assert "Deleted-By" not in unrelated


def job(rv: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "report",
            "namespace": "default",
            "uid": "7a7a7a7a-0000-4000-8000-0000000000cc",
            "resourceVersion": rv,
        },
        "spec": {
            "ttlSecondsAfterFinished": 60,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "r", "image": "busybox"}],
                }
            },
        },
        "status": {"succeeded": 1},
    }


async def test_a_finished_job_deleted_by_the_ttl_controller_leaves_git(harness: Harness) -> None:
    ref = {"group": "batch", "resource": "jobs", "name": "report"}
    await harness.send(event("create", **ref, body=job("600")))
    # The TTL controller deletes in the foreground: the garbage collector deletes the Pods,
    # then patches away the foregroundDeletion finalizer, and the Job is gone.
    await harness.send(
        by_controller(
            event(
                "delete", **ref, body=deleted(job("601"), "601", finalizers=["foregroundDeletion"])
            ),
            TTL_CONTROLLER,
        ),
        by_controller(
            event(
                "patch",
                **ref,
                request={"metadata": {"finalizers": None}},
                body=deleted(job("602"), "602", finalizers=None),
            ),
            GARBAGE_COLLECTOR,
        ),
    )
    await harness.sync()

    assert await harness.files() == []
    last = (await commits(harness))[-1]
    assert last["subject"] == "[DELETE] batch/v1/jobs/default/report"
    ttl_email = "system-serviceaccount-kube-system-ttl-after-finished-controller"
    assert last["author"] == f"{TTL_CONTROLLER} <{ttl_email}@audit-reverser.invalid>"
    assert last["Deleted-By"] == GARBAGE_COLLECTOR


def _asked_and_finished() -> tuple[AuditEvent, AuditEvent]:
    ask = parse_event(
        _pvc_event(
            "delete",
            deleted(pvc("202"), "202", finalizers=["kubernetes.io/pvc-protection"]),
            user="bob@example.com",
        )
    )
    finish = parse_event(
        by_controller(
            _pvc_event("update", deleted(pvc("203"), "203", finalizers=None)), PVC_PROTECTION
        )
    )
    return ask, finish


def test_requests_older_than_a_week_are_not_kept_across_a_restart() -> None:
    ask, finish = _asked_and_finished()
    before = Deletions()
    before.asked(ask, person=True)
    now = time.time()
    for later, kept in ((now + 60, True), (now + KEPT_AGE_S + 60, False)):
        after = Deletions()
        after.restore(orjson.loads(orjson.dumps(before.export(now))), later)
        found = after.requester(finish, "shop", "data")
        assert (found.user.username if found else None) == ("bob@example.com" if kept else None)


@pytest.mark.parametrize(
    "damaged",
    [
        b'{"requests": [{"x": 1}]',  # cut short
        b'{"requests": [{"x": 1}], "objects": [[["a"], 0]], "uids": [], "owners": []}',
        b"[]",
    ],
)
async def test_a_damaged_memory_of_deletions_is_set_aside_and_serve_starts(
    tmp_path: Path, damaged: bytes
) -> None:
    state = tmp_path / "state"
    await asyncio.to_thread(state.mkdir)
    await asyncio.to_thread((state / "deletions.json").write_bytes, damaged)
    started = await start_harness(tmp_path, settings={"journal": True})
    try:
        await started.send(event("create", name="after", body=configmap("after")))
        await started.sync()
        assert await started.files() == ["live/v1/configmaps/default/after.yaml"]
    finally:
        await started.runtime.close()
    assert await asyncio.to_thread((state / "deletions.json.bad").exists)


CREATE_AND_DELETE_ONLY = """\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: team}}
spec: {{url: "file://{remote}", allowedBranches: ["main"]}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: live, namespace: team}}
spec: {{providerRef: {{name: origin}}, branch: main, path: live}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: claims}}
spec:
  targetRef: {{name: live, namespace: team}}
  rules:
    - {{scope: Namespaced, operations: [CREATE, DELETE], resources: ["persistentvolumeclaims"]}}
"""


async def _harness_with(
    tmp_path: Path,
    config_text: str,
    source: ApiObjects | None = None,
    *,
    cluster_folders: bool = False,
) -> Harness:
    def prepare() -> Harness:
        remote = bare_repo(tmp_path / "remote.git")
        path = tmp_path / "rules.yaml"
        path.write_text(config_text.format(remote=remote))
        config = dataclasses.replace(load_config([path]), cluster_folders=cluster_folders)
        settings = Settings(state_dir=tmp_path / "state")
        runtime = Runtime(config, settings, source=source)
        return Harness(runtime, remote)

    started = await asyncio.to_thread(prepare)
    await started.runtime.start()
    return started


async def test_a_deletion_finished_by_an_update_is_a_delete_for_rules_that_select_deletes(
    tmp_path: Path,
) -> None:
    """A rule for CREATE and DELETE only: the controller's update that removes the last
    finalizer is the deletion, not an update it ignores."""
    harness = await _harness_with(tmp_path, CREATE_AND_DELETE_ONLY)
    try:
        await harness.send(
            _pvc_event("create", pvc("200", ["kubernetes.io/pvc-protection"])),
            # A user's update: not selected.
            _pvc_event("update", pvc("201", ["kubernetes.io/pvc-protection"]), user="x@a.com"),
        )
        asked = deleted(pvc("202"), "202", finalizers=["kubernetes.io/pvc-protection"])
        await harness.send(_pvc_event("delete", asked, user="bob@example.com"))
        await harness.sync()
        assert await harness.files() == [PVC_FILE]
        released = deleted(pvc("203"), "203", finalizers=None)
        await harness.send(by_controller(_pvc_event("update", released), PVC_PROTECTION))
        await harness.sync()

        assert await harness.files() == []
        last = (await commits(harness))[-1]
        assert last["subject"] == "[DELETE] v1/persistentvolumeclaims/shop/data"
        assert last["author"] == "bob@example.com <bob@example.com>"
        assert last["Deleted-By"] == PVC_PROTECTION and last["Verb"] == "update"
        assert len(await commits(harness)) == 2  # the create and the deletion
    finally:
        await harness.runtime.close()


CONFIGMAPS_CREATED_AND_DELETED = CREATE_AND_DELETE_ONLY.replace(
    "persistentvolumeclaims", "configmaps"
)


async def test_a_metadata_level_write_is_a_delete_only_when_the_api_shows_the_object_gone(
    tmp_path: Path, cluster: Cluster
) -> None:
    """Without its object, a write to an object whose deletion was asked for is routed both
    ways until the API answers: gone, a deletion; still there, an update (not selected)."""
    source = ApiObjects(cluster.client)
    harness = await _harness_with(tmp_path, CONFIGMAPS_CREATED_AND_DELETED, source)
    try:
        held = ["example.com/cleanup"]
        for name in ("gone", "kept"):
            await harness.send(
                event("create", name=name, body=configmap(name, finalizers=held)),
                event(
                    "delete",
                    name=name,
                    body=deleted(configmap(name, finalizers=held), "101", finalizers=held),
                    user="bob@example.com",
                    audit_id=f"bob-deletes-{name}",
                ),
            )
        still = deleted(configmap("kept", data={"v": "2"}), "102", finalizers=held)
        cluster.add("v1/configmaps", "default", "kept", still)
        await harness.send(
            by_controller(event("update", name="gone", level="Metadata"), GARBAGE_COLLECTOR),
            event("update", name="kept", level="Metadata", user="carol@example.com"),
        )
        await harness.sync()

        assert await harness.files() == ["live/v1/configmaps/default/kept.yaml"]
        last = (await commits(harness))[-1]
        assert last["subject"] == "[DELETE] v1/configmaps/default/gone"
        assert last["author"] == "bob@example.com <bob@example.com>"
        assert last["Deleted-By"] == GARBAGE_COLLECTOR
        assert "v: '2'" not in await harness.show("live/v1/configmaps/default/kept.yaml")
    finally:
        await harness.runtime.close()


DEFINITIONS_AND_INSTANCES_APART = """\
apiVersion: configbutler.ai/v1alpha1
kind: GitProvider
metadata: {{name: origin, namespace: team}}
spec: {{url: "file://{remote}", allowedBranches: ["main"]}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: definitions, namespace: team}}
spec: {{providerRef: {{name: origin}}, branch: main, path: definitions}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitTarget
metadata: {{name: apps, namespace: team}}
spec: {{providerRef: {{name: origin}}, branch: main, path: apps}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: crds}}
spec:
  targetRef: {{name: definitions, namespace: team}}
  rules: [{{scope: Cluster, resources: ["customresourcedefinitions"]}}]
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: widgets}}
spec:
  targetRef: {{name: apps, namespace: team}}
  rules: [{{scope: Namespaced, resources: ["widgets.example.com"]}}]
"""


@pytest.mark.parametrize("definitions_selected", [True, False])
async def test_a_crd_removed_takes_its_instances_from_targets_that_do_not_select_it(
    tmp_path: Path, definitions_selected: bool
) -> None:
    """One target holds the definitions (or none does), another the widgets; two clusters
    post (each has its folder): the CRD's deletion in prod empties prod's widgets in the
    other target too, in one commit per target, and leaves staging's."""
    rules = DEFINITIONS_AND_INSTANCES_APART
    if not definitions_selected:
        rules = rules.replace("customresourcedefinitions", "nothing-here")
    harness = await _harness_with(tmp_path, rules, cluster_folders=True)

    async def send(cluster: str, *items: dict[str, Any]) -> None:
        intake = harness.runtime.intake
        await intake.accept(intake.triage(items, cluster=cluster), cluster=cluster)

    crd_ref = {
        "group": "apiextensions.k8s.io",
        "resource": "customresourcedefinitions",
        "namespace": None,
        "name": "widgets.example.com",
    }
    widgets = {"group": "example.com", "resource": "widgets"}
    try:
        await send(
            "prod",
            event("create", **crd_ref, body=crd("500")),
            event("create", **widgets, name="w1", body=widget("w1", "default", "v1")),
            event(
                "create",
                **widgets,
                version="v1beta1",
                namespace="team",
                name="w2",
                body=widget("w2", "team", "v1beta1"),
            ),
        )
        await send(
            "staging", event("create", **widgets, name="w1", body=widget("w1", "default", "v1"))
        )
        await harness.sync()
        assert len(await harness.files()) == 3 + definitions_selected
        cleanup = ["customresourcecleanup.apiextensions.k8s.io"]
        await send(
            "prod",
            event(
                "delete",
                **crd_ref,
                body=crd("501", cleanup, terminating=True),
                user="dave@example.com",
            ),
            by_apiserver(
                event("update", **crd_ref, subresource="status", body=crd("502", terminating=True))
            ),
        )
        await harness.sync()

        assert await harness.files() == ["apps/staging/example.com/v1/widgets/default/w1.yaml"]
        deletions = [c for c in await commits(harness) if c["subject"].startswith("[DELETE]")]
        removed = {
            "apps/prod/example.com/v1/widgets/default/w1.yaml "
            "apps/prod/example.com/v1beta1/widgets/team/w2.yaml",
        }
        if definitions_selected:
            removed.add(
                "definitions/prod/apiextensions.k8s.io/v1/customresourcedefinitions/"
                "widgets.example.com.yaml"
            )
        assert {c["removed"] for c in deletions} == removed and len(deletions) == len(removed)
        # Without a rule for CRDs, their create and the delete that finished nothing.
        skipped = harness.runtime.stats.skipped
        assert (skipped[Skip.NO_RULE], skipped[Skip.EXCLUDED_BY_RULE]) == (
            (0, 0) if definitions_selected else (2, 0)
        )
        for commit in deletions:
            assert commit["subject"] == (
                "[DELETE] prod/apiextensions.k8s.io/v1/customresourcedefinitions/"
                "widgets.example.com"
            )
            assert commit["author"] == "dave@example.com <dave@example.com>"
            assert commit["Deleted-By"] == "system:apiserver"
    finally:
        await harness.runtime.close()


async def test_a_cascade_finished_after_a_restart_is_still_the_owners_deleters(
    tmp_path: Path,
) -> None:
    owner_uid = "1a2b3c4d-0000-4000-8000-0000000000aa"
    owned_uid = "5e6f7a8b-0000-4000-8000-0000000000bb"
    owner_ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": owner_uid}
    owned = configmap("web-config", ownerReferences=[owner_ref], uid=owned_uid)
    web = {"group": "apps", "resource": "deployments", "name": "web"}
    first = await start_harness(tmp_path, settings={"journal": True})
    try:
        await first.send(
            event("create", **web, body=deployment("web", "default", owner_uid)),
            event("create", name="web-config", body=owned),
        )
        await first.send(
            event(
                "delete",
                **web,
                body=success("web", "deployments", owner_uid, "apps"),
                user="erin@example.com",
            )
        )
        await first.sync()
    finally:
        await first.runtime.close()

    second = await start_harness(tmp_path, settings={"journal": True})
    try:
        await second.send(
            by_controller(
                event(
                    "delete", name="web-config", body=success("web-config", "configmaps", owned_uid)
                ),
                GARBAGE_COLLECTOR,
            )
        )
        await second.sync()
        assert await second.files() == []
        last = (await commits(second))[-1]
        assert last["subject"] == "[DELETE] v1/configmaps/default/web-config"
        assert last["author"] == "erin@example.com <erin@example.com>"
        assert last["Deleted-By"] == GARBAGE_COLLECTOR
    finally:
        await second.runtime.close()
