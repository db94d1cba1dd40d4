"""Who may send audit events: TLS server settings, client certificates, bearer tokens.

With ``--client-ca`` the TLS handshake verifies a client certificate *when one is offered*
(a wrong CA or an expired certificate never completes the handshake); the webhook handler
then refuses requests that offered none. Optional verification keeps ``/healthz`` and
``/readyz`` open to probes that have no client certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit_reverser.errors import PermanentError, shown


class SenderRefused(Exception):
    """The request does not come from an allowed sender; ``status`` is 401 or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class SenderPolicy:
    token_digest: bytes | None = None
    client_certificate: bool = False
    # Allowed client certificate names (CN or DNS/URI/IP SAN); empty: any the CA signed.
    client_names: frozenset[str] = frozenset()
    # A fleet's clusters post under their names: each name only with a client certificate
    # that carries it, so that one cluster's credentials cannot write another's files.
    cluster_names: bool = False

    @property
    def authenticates(self) -> bool:
        return self.token_digest is not None or self.client_certificate

    def check(
        self, authorization: str | None, peercert: Mapping[str, Any] | None, cluster: str = ""
    ) -> None:
        """Raise :class:`SenderRefused` unless the request, posted under ``cluster`` (""
        for none), carries what the policy asks."""
        if self.client_certificate:
            if not peercert:
                raise SenderRefused(401, "a client certificate is required")
            names = certificate_names(peercert)
            if self.client_names and not names & self.client_names:
                raise SenderRefused(
                    403, f"client certificate {sorted(names)} is not in the allowed names"
                )
            if self.cluster_names and cluster not in names:
                raise SenderRefused(
                    403,
                    f"client certificate {sorted(names)} does not name cluster {shown(cluster)}"
                    if cluster
                    else "post under a cluster name (/audit-webhook/<cluster>) that the "
                    "client certificate carries",
                )
        if self.token_digest is not None:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise SenderRefused(401, "a bearer token is required")
            # Digests of equal length: the comparison leaks neither content nor length.
            given = hashlib.sha256(token.strip().encode()).digest()
            if not hmac.compare_digest(given, self.token_digest):
                raise SenderRefused(403, "the bearer token is not valid")


def certificate_names(peercert: Mapping[str, Any]) -> set[str]:
    """Subject CN and subjectAltName values of a certificate as :mod:`ssl` reports it."""
    names = {
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    }
    names.update(value for _kind, value in peercert.get("subjectAltName", ()))
    return names


def load_token(path: Path) -> bytes:
    """SHA-256 of the token in ``path``; the token itself is never kept or logged."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise PermanentError(f"--auth-token-file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PermanentError(f"--auth-token-file {path}: not UTF-8 text") from exc
    if not token or any(c.isspace() for c in token):
        raise PermanentError(f"--auth-token-file {path}: must hold one token (no spaces)")
    return hashlib.sha256(token.encode()).digest()


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentError(f"--client-ca {client_ca}: {_reason(exc)}") from exc
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(f"--tls-cert {cert} / --tls-key {key}: {_reason(exc)}") from exc


class CertificateReloader:
    """Puts a renewed serving certificate into the running TLS context.

    cert-manager renews certificates well before they expire and the kubelet swaps the files
    of a Secret volume in place; without a reload the old certificate would be served until
    it expires and the apiserver's batches would start failing. New handshakes use the new
    certificate, open connections keep theirs. A pair that does not load (a half-written
    renewal) is reported and the old one kept.
    """

    def __init__(self, context: ssl.SSLContext, cert: Path, key: Path) -> None:
        self._context = context
        self._cert = cert
        self._key = key
        self._seen = self._signature()

    def _signature(self) -> tuple[tuple[int, int], ...]:
        signature = []
        for path in (self._cert, self._key):
            try:
                stat = path.stat()
            except OSError:
                signature.append((-1, -1))
            else:
                signature.append((stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    def reload_if_changed(self) -> bool:
        """Load the files again when they changed since the last look; True when reloaded."""
        signature = self._signature()
        if signature == self._seen:
            return False
        self._seen = signature
        _load_chain(self._context, self._cert, self._key)
        return True


def policy(
    *,
    token_file: Path | None,
    client_ca: Path | None,
    client_names: Iterable[str],
    cluster_names: bool = False,
) -> SenderPolicy:
    return SenderPolicy(
        token_digest=load_token(token_file) if token_file is not None else None,
        client_certificate=client_ca is not None,
        client_names=frozenset(client_names),
        cluster_names=cluster_names,
    )


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
