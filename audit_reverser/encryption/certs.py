"""Certificates for a quick start: a CA, the receiver's serving certificate and the
kube-apiserver's client certificate (for ``serve --client-ca``). For production, cert-manager
(or your PKI) is the better source; these are plain files with ECDSA P-256 keys.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from audit_reverser.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Written:
    ca: Path
    server: Path
    client: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created with 0600 from the first byte; an existing file is never overwritten.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def make(directory: Path, *, hosts: list[str], client_name: str, days: int) -> Written:
    """Write ca.crt/ca.key, server.crt/server.key (for ``hosts``) and client.crt/client.key
    (common name ``client_name``) into ``directory``; refuses to overwrite any of them."""
    names = ("ca", "server", "client")
    existing = [
        p for n in names for p in (directory / f"{n}.crt", directory / f"{n}.key") if p.exists()
    ]
    if existing:
        raise ConfigError([f"{existing[0]} exists: certs never overwrites keys"])
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("audit-reverser CA"))
        .issuer_name(_name("audit-reverser CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", ca_key)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    for stem, common_name, usage, alt in (
        ("server", hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts),
        ("client", client_name, ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alt:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_alt_names(alt)), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_key(directory / f"{stem}.key", key)
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Written(
        ca=directory / "ca.crt", server=directory / "server.crt", client=directory / "client.crt"
    )
