"""Every event rule of DESIGN.md, each as a user sees it: files and commits in the remote."""

from __future__ import annotations

import copy
import hashlib

import pytest
import yaml

from audit_reverser.pipeline import processor
from audit_reverser.pipeline.filter import Skip
from tests.conftest import Harness, configmap, event

DEMO = "live/v1/configmaps/default/demo.yaml"


async def test_create_commits_sanitized_object_attributed_to_the_user(harness: Harness) -> None:
    await harness.send(event("create", body=configmap(data={"greeting": "hello"})))
    await harness.sync()

    assert await harness.files() == [DEMO]
    assert yaml.safe_load(await harness.show(DEMO)) == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "demo", "namespace": "default"},
        "data": {"greeting": "hello"},
    }
    [entry] = await harness.log("%s|%an|%ae|%aI|%cn|%cI")
    assert entry == (
        "[CREATE] v1/configmaps/default/demo|alice@example.com|alice@example.com|"
        "2026-01-02T03:04:05+00:00|audit-reverser|2026-01-02T03:04:05+00:00"
    )


async def test_commit_body_carries_trailers(harness: Harness) -> None:
    await harness.send(
        event(
            "create",
            body=configmap(),
            audit_id="a1b2",
            user="bob",
            groups=["dev", "system:authenticated"],
        )
    )
    await harness.sync()
    [body] = await harness.log("%b")
    assert body.splitlines() == [
        "Audit-ID: a1b2",
        "Verb: create",
        "User: bob",
        "Groups: dev, system:authenticated",
        "User-Agent: kubectl/v1.31.0 (linux/amd64) kubernetes/abc1234",
        "Source-IP: 10.0.0.7",
        "Resource-Version: 100",
    ]
    [author] = await harness.log("%an <%ae>")
    assert author == "bob <bob@audit-reverser.invalid>"


async def test_webhook_items_without_kind_and_log_lines_with_kind_are_both_accepted(
    harness: Harness,
) -> None:
    webhook_item = event("create", name="a", body=configmap("a"))
    log_line = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        **event("create", name="b", body=configmap("b")),
    }
    await harness.send(webhook_item, log_line)
    await harness.sync()
    assert await harness.subjects() == [
        "[CREATE] v1/configmaps/default/a",
        "[CREATE] v1/configmaps/default/b",
    ]


async def test_only_completed_successful_persisted_writes_are_kept(harness: Harness) -> None:
    body = configmap()
    await harness.send(
        event("create", body=body, stage="ResponseStarted"),
        event("create", body=body, stage="RequestReceived"),
        event("create", body=body, code=409),
        event("update", body=body, code=422),
        event("get", body=body),
        event("list", name=None, body={"kind": "ConfigMapList", "items": [body]}),
        event("watch", name=None),
        event("create", body=body, query="dryRun=All"),
        event("patch", body=body, query="fieldManager=kubectl&dryRun=All"),
        event("create", body=body, query="dry%52un=All"),  # the apiserver decodes the key
        event("update", body=body, subresource="status"),
    )
    await harness.sync()
    assert await harness.files() == []
    skipped = harness.runtime.stats.skipped
    assert skipped[Skip.NOT_COMPLETE] == 2
    assert skipped[Skip.FAILED] == 2
    assert skipped[Skip.READ] == 3
    assert skipped[Skip.DRY_RUN] == 3
    assert skipped[Skip.STATUS] == 1


async def test_patch_event_commits_response_object_not_patch_body(harness: Harness) -> None:
    patch = [{"op": "replace", "path": "/data/greeting", "value": "patched"}]
    await harness.send(
        event("patch", request=patch, body=configmap(data={"greeting": "patched", "other": "kept"}))
    )
    await harness.sync()
    assert yaml.safe_load(await harness.show(DEMO))["data"] == {
        "greeting": "patched",
        "other": "kept",
    }
    assert await harness.subjects() == ["[UPDATE] v1/configmaps/default/demo"]


async def test_generate_name_create_takes_the_name_from_the_response(harness: Harness) -> None:
    body = configmap("job-7xk2p", generateName="job-")
    await harness.send(event("create", name=None, body=body))
    await harness.sync()
    assert await harness.files() == ["live/v1/configmaps/default/job-7xk2p.yaml"]
    assert "generateName" not in await harness.show("live/v1/configmaps/default/job-7xk2p.yaml")


async def test_delete_removes_the_file_when_the_response_is_a_status(harness: Harness) -> None:
    await harness.send(
        event("create", body=configmap()),
        event(
            "delete",
            body={
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Success",
                "details": {"name": "demo", "kind": "configmaps"},
            },
        ),
    )
    await harness.sync()
    assert await harness.files() == []
    assert await harness.subjects() == [
        "[CREATE] v1/configmaps/default/demo",
        "[DELETE] v1/configmaps/default/demo",
    ]


async def test_finalizers_keep_the_file_until_the_last_one_is_removed(harness: Harness) -> None:
    held = configmap(
        rv="101",
        finalizers=["example.com/cleanup"],
        deletionTimestamp="2026-01-02T03:05:00Z",
        deletionGracePeriodSeconds=0,
    )
    released = copy.deepcopy(held)
    released["metadata"]["resourceVersion"] = "102"
    del released["metadata"]["finalizers"]
    await harness.send(
        event("create", body=configmap(rv="100", finalizers=["example.com/cleanup"]))
    )
    await harness.send(event("delete", body=held))
    await harness.sync()
    assert await harness.files() == [DEMO], "held by a finalizer: the object still exists"

    await harness.send(event("update", body=released, user="system:serviceaccount:x:ctrl"))
    await harness.sync()
    assert await harness.files() == []
    assert (await harness.subjects())[-1] == "[DELETE] v1/configmaps/default/demo"


async def test_deleted_object_without_finalizers_in_response_is_gone(harness: Harness) -> None:
    crd_like = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w1", "namespace": "default", "resourceVersion": "9"},
        "spec": {"size": 3},
    }
    await harness.send(
        event("create", group="example.com", resource="widgets", name="w1", body=crd_like)
    )
    await harness.send(
        event("delete", group="example.com", resource="widgets", name="w1", body=crd_like)
    )
    await harness.sync()
    assert await harness.subjects() == [
        "[CREATE] example.com/v1/widgets/default/w1",
        "[DELETE] example.com/v1/widgets/default/w1",
    ]


async def test_deletecollection_removes_each_deleted_item(harness: Harness) -> None:
    await harness.send(*(event("create", name=n, body=configmap(n)) for n in ("a", "b", "c")))
    deleted = {
        "kind": "ConfigMapList",
        "apiVersion": "v1",
        "metadata": {},
        "items": [
            {k: v for k, v in configmap(n).items() if k not in ("kind", "apiVersion")}
            for n in ("a", "b")
        ],
    }
    await harness.send(event("deletecollection", name=None, body=deleted))
    await harness.sync()
    assert await harness.files() == ["live/v1/configmaps/default/c.yaml"]
    assert (await harness.subjects())[-2:] == [
        "[DELETE] v1/configmaps/default/a",
        "[DELETE] v1/configmaps/default/b",
    ]


async def test_the_same_event_twice_makes_one_commit(harness: Harness) -> None:
    """A batch the apiserver sent again: the same event, one commit."""
    first = event("create", body=configmap(data={"v": "1"}), audit_id="same-id")
    await harness.send(first, first)
    await harness.send(first)
    await harness.sync()
    assert await harness.subjects() == ["[CREATE] v1/configmaps/default/demo"]
    assert harness.runtime.stats.skipped[Skip.DUPLICATE] == 2


async def test_a_reused_audit_id_does_not_hide_a_change(harness: Harness) -> None:
    """A client may choose its request's Audit-ID (the header), also one already used: the
    apiserver's receive time tells the requests apart, and the second change is committed."""
    first = event("create", body=configmap(data={"v": "1"}), audit_id="same-id")
    again = event(
        "update",
        body=configmap(data={"v": "2"}, rv="101"),
        audit_id="same-id",
        user="mallory",
        time="2026-01-02T03:09:00.000001Z",
    )
    await harness.send(first)
    await harness.send(again)
    await harness.sync()
    assert await harness.subjects() == [
        "[CREATE] v1/configmaps/default/demo",
        "[UPDATE] v1/configmaps/default/demo",
    ]
    assert (await harness.log("%an"))[-1] == "mallory"


@pytest.mark.parametrize("audit_id", ["with space", "x" * 200, "tab\there", "ünïcode"])
async def test_an_odd_audit_id_is_committed_under_its_digest(
    harness: Harness, audit_id: str
) -> None:
    """Older apiservers take any Audit-ID header, newer ones up to 256 characters: the change
    is committed, its trailer naming the Audit-ID by its SHA-256."""
    await harness.send(event("create", body=configmap(), audit_id=audit_id))
    await harness.sync()
    assert await harness.subjects() == ["[CREATE] v1/configmaps/default/demo"]
    [trailer] = await harness.log("%(trailers:key=Audit-ID,valueonly)")
    assert trailer.strip() == "sha256-" + hashlib.sha256(audit_id.encode()).hexdigest()


async def test_an_older_event_never_regresses_the_file(harness: Harness) -> None:
    await harness.send(event("update", body=configmap(data={"v": "new"}, rv="200")))
    await harness.send(event("update", body=configmap(data={"v": "old"}, rv="150")))
    await harness.sync()
    assert yaml.safe_load(await harness.show(DEMO))["data"] == {"v": "new"}
    assert harness.runtime.stats.skipped[Skip.STALE] == 1


async def test_a_file_written_long_ago_is_checked_against_its_last_commit(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processor, "VERSION_WINDOW", 2)  # remembers the last 2 files only

    def update(name: str, rv: int, value: str) -> dict[str, object]:
        return event("update", name=name, body=configmap(name, data={"v": value}, rv=str(rv)))

    await harness.send(update("demo", 200, "new"))
    await harness.send(update("b", 300, "b"), update("c", 400, "c"), update("d", 500, "d"))
    await harness.sync()
    assert len(harness.runtime.processor._versions) == 2  # demo's version was forgotten
    await harness.send(update("demo", 150, "old"))  # older than demo's last commit
    await harness.sync()
    assert yaml.safe_load(await harness.show(DEMO))["data"] == {"v": "new"}
    assert harness.runtime.stats.skipped[Skip.STALE] == 1
    await harness.send(update("demo", 250, "newer"), update("e", 100, "e"))
    await harness.sync()
    assert yaml.safe_load(await harness.show(DEMO))["data"] == {"v": "newer"}
    assert (await harness.subjects())[-2:] == [
        "[UPDATE] v1/configmaps/default/demo",
        "[UPDATE] v1/configmaps/default/e",
    ]


async def test_impersonated_user_is_the_author(harness: Harness) -> None:
    await harness.send(
        event("create", body=configmap(), user="system:admin", impersonated="jane@example.com")
    )
    await harness.sync()
    [entry] = await harness.log("%an <%ae>%n%b")
    assert entry.splitlines()[0] == "jane@example.com <jane@example.com>"
    assert "User: jane@example.com" in entry
    assert "Impersonated-By: system:admin" in entry


async def test_events_without_an_object_are_skipped_with_a_reason_not_guessed(
    harness: Harness,
) -> None:
    await harness.send(
        event("create", level="Metadata"),
        event("create", level="Request", request=configmap()),
        event("delete", level="Metadata"),
        event("deletecollection", name=None, level="Metadata"),
        event(
            "patch",
            resource="deployments",
            group="apps",
            subresource="scale",
            body={
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {"name": "demo"},
                "spec": {"replicas": 3},
            },
        ),
    )
    await harness.sync()
    assert await harness.files() == []
    assert harness.runtime.stats.skipped[Skip.NEEDS_API] == 5


async def test_secrets_are_never_written_without_encryption(harness: Harness) -> None:
    secret = {
        "kind": "Secret",
        "apiVersion": "v1",
        "type": "Opaque",
        "metadata": {"name": "db", "namespace": "default", "resourceVersion": "5"},
        "data": {"password": "aHVudGVyMg=="},
    }
    await harness.send(event("create", resource="secrets", name="db", body=secret))
    await harness.sync()
    assert await harness.files() == []
    assert harness.runtime.stats.skipped[Skip.SECRET] == 1


async def test_an_update_that_changes_nothing_after_sanitizing_makes_no_commit(
    harness: Harness,
) -> None:
    await harness.send(event("create", body=configmap(rv="1")))
    # Only server-owned fields differ: resourceVersion, managedFields, annotations it owns.
    await harness.send(
        event(
            "update",
            body=configmap(
                rv="2", annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"}
            ),
        )
    )
    await harness.sync()
    assert await harness.subjects() == ["[CREATE] v1/configmaps/default/demo"]


async def test_forged_names_never_write_outside_the_target_path(harness: Harness) -> None:
    for name in ("../../etc/passwd", "a/b", "..", "x\x00y", ".hidden"):
        await harness.send(event("create", name=name, body=configmap(name)))
    await harness.send(event("create", namespace="../x", body=configmap(namespace="../x")))
    await harness.sync()
    assert await harness.files() == []
    assert harness.runtime.stats.skipped[Skip.INVALID_NAME] == 6


async def test_cluster_scoped_objects_and_namespaces_have_no_namespace_folder(
    harness: Harness,
) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "system:controller:demo", "resourceVersion": "3"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
    }
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "team-a", "resourceVersion": "4"},
        "spec": {},
    }
    await harness.send(
        event(
            "create",
            group="rbac.authorization.k8s.io",
            resource="clusterroles",
            namespace=None,
            name="system:controller:demo",
            body=role,
        ),
        # The apiserver puts a Namespace's name into objectRef.namespace on updates.
        event("update", resource="namespaces", namespace="team-a", name="team-a", body=namespace),
    )
    await harness.sync()
    assert await harness.files() == [
        "live/rbac.authorization.k8s.io/v1/clusterroles/system:controller:demo.yaml",
        "live/v1/namespaces/team-a.yaml",
    ]
    role_file = "live/rbac.authorization.k8s.io/v1/clusterroles/system:controller:demo.yaml"
    assert yaml.safe_load(await harness.show(role_file))["rules"] == role["rules"]


async def test_a_server_side_dry_run_delete_leaves_the_file(harness: Harness) -> None:
    """kubectl delete --dry-run=server puts dryRun in the DeleteOptions body, not the URL:
    the object stays in the cluster, and its file in Git."""
    await harness.send(event("create", body=configmap()))
    await harness.sync()
    gone = {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
    options = {"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]}
    await harness.send(event("delete", body=gone, request=options))
    await harness.sync()
    assert await harness.files() == [DEMO]
    assert harness.runtime.stats.skipped[Skip.DRY_RUN] == 1
