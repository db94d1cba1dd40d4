"""Only allowed senders get events in: mutual TLS, bearer tokens, and no open port by accident.

Real ``serve`` processes, real TLS handshakes, certificates made in the test.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from audit_reverser.errors import PermanentError
from audit_reverser.ingest import auth
from tests.conftest import (
    Served,
    bare_repo,
    configmap,
    event,
    event_list,
    free_port,
    git_subjects,
    request,
    start_serve,
    write_config,
)
from tests.pki import Authority, Issued

BATCH = orjson.dumps(event_list(event("create", body=configmap())))


def _post(
    port: int,
    *,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/audit-webhook",
) -> tuple[int, dict[str, object]]:
    method, body = ("POST", BATCH) if path.startswith("/audit-webhook") else ("GET", None)
    status, data = request(port, method, path, body, headers=headers, context=context)
    return status, orjson.loads(data) if data.startswith(b"{") else {}


def _client(ca: Authority, identity: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.cert)
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[str]]:
    remote = bare_repo(tmp_path / "remote.git")
    config = write_config(tmp_path / "c.yaml", remote)
    return remote, ["--config", str(config), "--state-dir", str(tmp_path / "state")]


def _serve_mutual_tls(tmp_path: Path, ca: Authority, *args: str) -> Served:
    """``serve`` with HTTPS by a certificate of ``ca``, asking for a client certificate of it."""
    server_cert = ca.issue("audit-reverser", server=True)
    tls = ["--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key)]
    return start_serve(tmp_path, *args, *tls, "--client-ca", str(ca.cert), ca=ca.cert)


def test_mutual_tls_admits_only_the_named_client_of_the_right_ca(
    tmp_path: Path, setup: tuple[Path, list[str]]
) -> None:
    remote, args = setup
    ca, other_ca = Authority(tmp_path, "cluster-ca"), Authority(tmp_path, "other-ca")
    apiserver = ca.issue("kube-apiserver")
    server = _serve_mutual_tls(tmp_path, ca, *args, "--client-name", "kube-apiserver")
    port = server.port
    try:
        assert _post(port, context=_client(ca, apiserver))[0] == 200
        status, body = _post(port, context=_client(ca))
        assert (status, body["reason"]) == (401, "Unauthorized")
        status, body = _post(port, context=_client(ca, ca.issue("someone-else")))
        assert status == 403 and "someone-else" in str(body["message"])
        for refused in (other_ca.issue("kube-apiserver"), ca.issue("kube-apiserver", expired=True)):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _post(port, context=_client(ca, refused))
        with pytest.raises(ssl.SSLError):  # nor does a client that does not trust our CA
            _post(port, context=_client(other_ca, apiserver))
        # Probes have no client certificate and still get an answer.
        assert _post(port, context=_client(ca), path="/healthz")[0] == 200
        assert _post(port, context=_client(ca), path="/readyz")[0] == 200
    finally:
        log = server.stop()
    assert server.process.returncode == 0, log
    assert git_subjects(remote) == ["[CREATE] v1/configmaps/default/demo"]


def test_each_cluster_name_only_from_a_certificate_that_carries_it(
    tmp_path: Path, setup: tuple[Path, list[str]]
) -> None:
    """A fleet: staging's apiserver credentials cannot post as prod (nor unnamed, which
    would be the receiver's own cluster)."""
    remote, args = setup
    ca = Authority(tmp_path, "fleet-ca")
    prod, staging = ca.issue("prod"), ca.issue("staging")
    server = _serve_mutual_tls(tmp_path, ca, *args, "--cluster-names-in-certificates")
    try:
        assert _post(server.port, context=_client(ca, prod), path="/audit-webhook/prod")[0] == 200
        status, body = _post(server.port, context=_client(ca, staging), path="/audit-webhook/prod")
        assert status == 403 and "does not name cluster 'prod'" in str(body["message"])
        status, body = _post(server.port, context=_client(ca, prod))
        assert status == 403 and "post under a cluster name" in str(body["message"])
    finally:
        log = server.stop()
    assert server.process.returncode == 0, log
    assert git_subjects(remote) == ["[CREATE] prod/v1/configmaps/default/demo"]


def test_bearer_token_is_checked_and_never_logged(
    tmp_path: Path, setup: tuple[Path, list[str]]
) -> None:
    remote, args = setup
    token = "s3cr3t-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    server = start_serve(tmp_path, *args, "--auth-token-file", str(token_file))
    port = server.port
    try:
        assert _post(port)[0] == 401
        assert _post(port, headers={"Authorization": "Basic " + token})[0] == 401
        assert _post(port, headers={"Authorization": "Bearer wrong"})[0] == 403
        assert _post(port, headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert _post(port, path="/readyz")[0] == 200
    finally:
        log = server.stop()
    assert server.process.returncode == 0, log
    assert "refused audit events" in log and token not in log
    assert git_subjects(remote) == ["[CREATE] v1/configmaps/default/demo"]


def _serve_fails(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "audit_reverser", "serve", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_unsafe_or_incomplete_flags_are_refused_with_one_line(
    tmp_path: Path, setup: tuple[Path, list[str]]
) -> None:
    _, args = setup
    open_port = f"0.0.0.0:{free_port()}"
    assert "--insecure" in _serve_fails(tmp_path, *args, "--listen", open_port)
    # TLS proves who we are, not who sends: without --client-ca or a token, still refused.
    server_cert = Authority(tmp_path, "ca").issue("audit-reverser", server=True)
    tls = ["--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key)]
    assert "--insecure" in _serve_fails(tmp_path, *args, "--listen", open_port, *tls)
    assert "go together" in _serve_fails(tmp_path, *args, "--tls-cert", "x.crt")
    missing = _serve_fails(tmp_path, *args, "--tls-cert", "x.crt", "--tls-key", "x.key")
    assert "x.crt" in missing
    assert "needs --client-ca" in _serve_fails(tmp_path, *args, "--client-name", "a")
    refused = _serve_fails(tmp_path, *args, "--cluster-names-in-certificates")
    assert "--cluster-names-in-certificates needs --client-ca" in refused
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    assert "one token" in _serve_fails(tmp_path, *args, "--auth-token-file", str(empty))


def test_insecure_listens_on_every_address_with_a_warning(
    tmp_path: Path, setup: tuple[Path, list[str]]
) -> None:
    _, args = setup
    port = free_port()
    server = start_serve(tmp_path, *args, "--listen", f"0.0.0.0:{port}", "--insecure", port=port)
    log = server.stop()
    assert server.process.returncode == 0, log
    assert "--insecure: anyone who can reach 0.0.0.0 may send audit events" in log


def test_the_webhook_config_it_prints_gets_an_apiserver_in(
    tmp_path: Path, setup: tuple[Path, list[str]]
) -> None:
    """What the kube-apiserver does with --audit-webhook-config-file, done by hand: server,
    CA and token from the printed kubeconfig, then one POST."""
    remote, args = setup
    ca = Authority(tmp_path, "cluster-ca")
    server_cert = ca.issue("audit-reverser", server=True)
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-for-the-apiserver\n")
    tls = ["--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key)]
    server = start_serve(tmp_path, *args, *tls, "--auth-token-file", str(token_file), ca=ca.cert)
    try:
        url = f"https://127.0.0.1:{server.port}/audit-webhook"
        printed = subprocess.run(
            [
                sys.executable,
                "-m",
                "audit_reverser",
                "webhook-config",
                "--url",
                url,
                "--ca",
                str(ca.cert),
                "--token-file",
                str(token_file),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        kubeconfig = yaml.safe_load(printed)
        [cluster] = kubeconfig["clusters"]
        [user] = kubeconfig["users"]
        authority = base64.b64decode(cluster["cluster"]["certificate-authority-data"]).decode()
        context = ssl.create_default_context(cadata=authority)
        headers = {"Authorization": f"Bearer {user['user']['token']}"}
        assert cluster["cluster"]["server"] == url
        assert _post(server.port, context=context, headers=headers)[0] == 200
    finally:
        server.stop()
    assert git_subjects(remote) == ["[CREATE] v1/configmaps/default/demo"]


def test_webhook_config_names_what_is_wrong(tmp_path: Path) -> None:
    def run(*options: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "audit_reverser", "webhook-config", *options]
        return subprocess.run(command, capture_output=True, text=True)

    for options, message in (
        (["--url", "ftp://x/y"], "expected https://HOST[:PORT]/audit-webhook"),
        (["--url", "https://h/a", "--ca", str(tmp_path / "none.crt")], "none.crt: No such file"),
        (["--url", "https://h/a", "--client-cert", "c.crt"], "go together"),
    ):
        done = run(*options)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_certs_gives_a_quick_start_with_mutual_tls(
    tmp_path: Path, setup: tuple[Path, list[str]]
) -> None:
    remote, args = setup
    out = tmp_path / "pki"
    make = [sys.executable, "-m", "audit_reverser", "certs", "--out", str(out)]
    done = subprocess.run(
        [*make, "--host", "127.0.0.1", "--host", "localhost"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    server = start_serve(
        tmp_path,
        *args,
        "--tls-cert",
        str(out / "server.crt"),
        "--tls-key",
        str(out / "server.key"),
        "--client-ca",
        str(out / "ca.crt"),
        "--client-name",
        "kube-apiserver",
        ca=out / "ca.crt",
    )
    try:
        client = _client_from(out / "ca.crt", out / "client.crt", out / "client.key")
        assert _post(server.port, context=client)[0] == 200
    finally:
        server.stop()
    assert git_subjects(remote) == ["[CREATE] v1/configmaps/default/demo"]
    again = subprocess.run([*make, "--host", "x"], capture_output=True, text=True)
    assert again.returncode == 2 and "never overwrites keys" in again.stderr


def _client_from(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


async def test_a_renewed_serving_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """cert-manager renews into the same files; new handshakes get the new certificate, a
    half-written renewal is refused and the old certificate stays."""
    ca = await asyncio.to_thread(Authority, tmp_path, "ca")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def install(name: str) -> None:
        issued = ca.issue(name, server=True)
        cert.write_bytes(issued.cert.read_bytes())
        key.write_bytes(issued.key.read_bytes())

    await asyncio.to_thread(install, "first")
    context = await asyncio.to_thread(auth.server_context, cert, key)
    reloader = await asyncio.to_thread(auth.CertificateReloader, context, cert, key)
    client = await asyncio.to_thread(ssl.create_default_context, cafile=ca.cert)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]

    async def served_name() -> str:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        peer = writer.get_extra_info("peercert")
        writer.close()
        return str(next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName"))

    try:
        assert await served_name() == "first"
        assert not await asyncio.to_thread(reloader.reload_if_changed)
        await asyncio.to_thread(install, "renewed")
        assert await asyncio.to_thread(reloader.reload_if_changed)
        assert await served_name() == "renewed"
        await asyncio.to_thread(key.write_text, "-----BEGIN PRIVATE KEY-----\nhalf\n")
        with pytest.raises(PermanentError, match="tls.key"):
            await asyncio.to_thread(reloader.reload_if_changed)
        assert await served_name() == "renewed"
    finally:
        server.close()
        await server.wait_closed()
