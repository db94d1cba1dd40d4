"""SSH signatures in OpenSSH's SSHSIG format (PROTOCOL.sshsig), made natively for signed commits.

Git with ``gpg.format=ssh`` keeps such a signature, armored, in a commit's ``gpgsig`` header
and checks it with ``ssh-keygen -Y verify`` (namespace ``git``); GitHub and GitLab show the
commit as verified when the key is a signing key of the committer's account.

Ed25519 and RSA (``rsa-sha2-512``, PKCS#1 v1.5) signatures are deterministic: the same commit
gets the same signature, so the same input still gives the same commit ids. ECDSA signatures
are randomized by the library (a fresh nonce each time), so commit ids differ between runs.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_ssh_private_key,
)

from audit_reverser.errors import ConfigError

MAGIC = b"SSHSIG"
VERSION = 1
NAMESPACE = b"git"
HASH_ALGORITHM = b"sha512"
ARMOR_BEGIN = b"-----BEGIN SSH SIGNATURE-----"
ARMOR_END = b"-----END SSH SIGNATURE-----"
# Below this, OpenSSH and the forges refuse RSA keys (or soon will).
MIN_RSA_BITS = 2048

_ECDSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    "secp256r1": hashes.SHA256(),
    "secp384r1": hashes.SHA384(),
    "secp521r1": hashes.SHA512(),
}

SigningPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _string(data: bytes) -> bytes:
    """An SSH wire-format ``string``: a 32-bit big-endian length, then the bytes."""
    return len(data).to_bytes(4, "big") + data


def _mpint(value: int) -> bytes:
    """An SSH ``mpint``: two's complement, big-endian, no needless leading bytes."""
    data = value.to_bytes(value.bit_length() // 8 + 1, "big") if value else b""
    return _string(data)


class SigningKey:
    """A private key that signs Git commits, with the public half users register."""

    def __init__(self, key: SigningPrivateKey) -> None:
        self._key = key
        line = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        kind, blob = line.split(b" ")[:2]
        self.key_type = kind.decode()
        self.public_blob = base64.b64decode(blob)

    @classmethod
    def load(cls, text: bytes, passphrase: bytes | None, *, source: str) -> SigningKey:
        """Read an OpenSSH (or PEM) private key; ``source`` names where it came from
        ("Secret team/git-creds: signingKey") in the :class:`ConfigError` saying why not."""
        load = load_ssh_private_key if b"OPENSSH PRIVATE KEY" in text else load_pem_private_key
        try:
            try:
                key = load(text, passphrase or None)
            except TypeError:
                if not passphrase:
                    raise
                key = load(text, None)  # a passphrase for a key without one does no harm
        except TypeError:  # the library's way of saying a passphrase is missing
            raise ConfigError(
                [f"{source}: the key is encrypted; put its passphrase under signingKeyPassphrase"]
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            what = "wrong signingKeyPassphrase, or " if passphrase else ""
            raise ConfigError(
                [f"{source}: cannot read the private key ({what}not an OpenSSH private key)"]
            ) from None
        if not isinstance(key, SigningPrivateKey):
            name = type(key).__name__.removeprefix("_").removesuffix("PrivateKey")
            raise ConfigError([f"{source}: {name} keys cannot sign; use ed25519, ECDSA or RSA"])
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                [f"{source}: RSA key of {key.key_size} bits; use at least {MIN_RSA_BITS}"]
            )
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in _ECDSA_HASHES:
            raise ConfigError([f"{source}: ECDSA curve {key.curve.name} is not one SSH signs with"])
        return cls(key)

    @property
    def public_key(self) -> str:
        """The public half as an ``authorized_keys`` / allowed-signers line (no comment)."""
        return f"{self.key_type} {base64.b64encode(self.public_blob).decode()}"

    @property
    def fingerprint(self) -> str:
        """``SHA256:…``, as ``ssh-keygen -l`` and the forges show it."""
        digest = base64.b64encode(hashlib.sha256(self.public_blob).digest()).decode()
        return "SHA256:" + digest.rstrip("=")

    @property
    def deterministic(self) -> bool:
        """Whether the same message always gets the same signature (not for ECDSA)."""
        return not isinstance(self._key, ec.EllipticCurvePrivateKey)

    def sign(self, message: bytes) -> bytes:
        """The armored SSHSIG signature of ``message`` in namespace ``git``, ending in a
        newline, as ``ssh-keygen -Y sign -n git`` writes it."""
        signed = (
            MAGIC
            + _string(NAMESPACE)
            + _string(b"")  # reserved
            + _string(HASH_ALGORITHM)
            + _string(hashlib.sha512(message).digest())
        )
        blob = (
            MAGIC
            + VERSION.to_bytes(4, "big")
            + _string(self.public_blob)
            + _string(NAMESPACE)
            + _string(b"")
            + _string(HASH_ALGORITHM)
            + _string(self._signature(signed))
        )
        text = base64.b64encode(blob)
        lines = [text[i : i + 70] for i in range(0, len(text), 70)]
        return b"\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + b"\n"

    def _signature(self, data: bytes) -> bytes:
        """An SSH signature blob: the algorithm name, then the signature in its encoding."""
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return _string(b"ssh-ed25519") + _string(key.sign(data))
        if isinstance(key, ec.EllipticCurvePrivateKey):
            der = key.sign(data, ec.ECDSA(_ECDSA_HASHES[key.curve.name]))
            r, s = decode_dss_signature(der)
            return _string(self.key_type.encode()) + _string(_mpint(r) + _mpint(s))
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA512())
        return _string(b"rsa-sha2-512") + _string(signature)
