"""age (https://age-encryption.org/v1) for X25519 recipients, built on ``cryptography``.

Only what SOPS needs: encrypt a small secret (the SOPS data key) to X25519 recipients as an
armored age file, decrypt one with an identity, and the bech32 key encodings
(``age1...`` recipients, ``AGE-SECRET-KEY-1...`` identities). The primitives (X25519,
HKDF-SHA-256, HMAC-SHA-256, ChaCha20-Poly1305) all come from ``cryptography``.

File format: a text header (version line, one ``-> X25519`` stanza per recipient with the
ephemeral share and the wrapped 16-byte file key, ``---`` and the header MAC), then a
16-byte nonce and the payload in 64 KiB ChaCha20-Poly1305 chunks; armored as PEM-like base64.
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from audit_reverser.errors import PermanentError

VERSION_LINE = b"age-encryption.org/v1"
_X25519_INFO = b"age-encryption.org/v1/X25519"
_CHUNK = 64 * 1024
_ARMOR_BEGIN = "-----BEGIN AGE ENCRYPTED FILE-----"
_ARMOR_END = "-----END AGE ENCRYPTED FILE-----"
RECIPIENT_PREFIX = "age"
IDENTITY_PREFIX = "AGE-SECRET-KEY-"


class AgeError(PermanentError):
    """A key or an age file that cannot be used; the message never holds key material."""


# -- bech32 (BIP 173), the encoding of age keys ---------------------------------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: list[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            checksum ^= _GENERATOR[i] if (top >> i) & 1 else 0
    return checksum


def _expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _regroup(data: bytes | list[int], source: int, target: int, pad: bool) -> list[int]:
    accumulator, bits, out = 0, 0, []
    for value in data:
        accumulator = (accumulator << source) | value
        bits += source
        while bits >= target:
            bits -= target
            out.append((accumulator >> bits) & ((1 << target) - 1))
    if pad and bits:
        out.append((accumulator << (target - bits)) & ((1 << target) - 1))
    elif not pad and (bits >= source or (accumulator << (target - bits)) & ((1 << target) - 1)):
        raise ValueError("invalid padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    values = _regroup(data, 8, 5, True)
    checksum = _polymod(_expand(hrp) + values + [0] * 6) ^ 1
    values += [(checksum >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[v] for v in values)


def bech32_decode(text: str) -> tuple[str, bytes]:
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    hrp, separator, rest = text.rpartition("1")
    if not separator or not hrp or len(rest) < 6 or any(c not in _CHARSET for c in rest):
        raise ValueError("not bech32")
    values = [_CHARSET.index(c) for c in rest]
    if _polymod(_expand(hrp) + values) != 1:
        raise ValueError("bad checksum")
    return hrp, bytes(_regroup(values[:-6], 5, 8, False))


# -- keys -----------------------------------------------------------------------------------


def parse_recipient(text: str) -> X25519PublicKey:
    try:
        hrp, key = bech32_decode(text.strip())
    except ValueError:
        hrp, key = "", b""
    if hrp != RECIPIENT_PREFIX or len(key) != 32:
        raise AgeError(f"{text.strip()[:90]!r} is not an age X25519 recipient (age1...)")
    return X25519PublicKey.from_public_bytes(key)


def recipient_text(key: X25519PublicKey) -> str:
    return bech32_encode(RECIPIENT_PREFIX, key.public_bytes(Encoding.Raw, PublicFormat.Raw))


@dataclass(frozen=True, slots=True)
class Identity:
    """An age X25519 identity (private key) and its recipient (public key)."""

    key: X25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> Identity:
        """The ``AGE-SECRET-KEY-1...`` line of an age key file (comments are ignored)."""
        lines = [line.strip() for line in text.splitlines()]
        keys = [line for line in lines if line and not line.startswith("#")]
        try:
            hrp, raw = bech32_decode(keys[0]) if len(keys) == 1 else ("", b"")
        except ValueError:
            hrp, raw = "", b""
        if hrp.upper() != IDENTITY_PREFIX or len(raw) != 32:
            # Never echo the text: it is (or is meant to be) a private key.
            raise AgeError("not an age X25519 identity (one AGE-SECRET-KEY-1... line)")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def recipient(self) -> str:
        return recipient_text(self.key.public_key())

    def secret_text(self) -> str:
        raw = self.key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return bech32_encode(IDENTITY_PREFIX.lower(), raw).upper()

    def key_file(self, created: str) -> str:
        """The key file ``age-keygen`` writes."""
        return f"# created: {created}\n# public key: {self.recipient}\n{self.secret_text()}\n"


# -- the file format ------------------------------------------------------------------------


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    if b"=" in data or b"\n" in data:
        raise AgeError("age header is not canonical base64")
    return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)


def _wrap_lines(data: bytes, width: int = 64) -> list[bytes]:
    return [data[i : i + width] for i in range(0, len(data), width)] or [b""]


_ZERO_NONCE = bytes(12)


def encrypt(plaintext: bytes, recipients: list[str]) -> str:
    """``plaintext`` as an armored age file for the X25519 ``recipients``."""
    if not recipients:
        raise AgeError("no age recipients")
    file_key = os.urandom(16)
    header = [VERSION_LINE]
    for name in recipients:
        recipient = parse_recipient(name)
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        shared = ephemeral.exchange(recipient)
        recipient_bytes = recipient.public_bytes(Encoding.Raw, PublicFormat.Raw)
        wrap_key = _hkdf(shared, share + recipient_bytes, _X25519_INFO)
        body = ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None)
        header.append(b"-> X25519 " + _b64(share))
        header.extend(_wrap_lines(_b64(body)))
    header.append(b"---")
    text = b"\n".join(header)
    mac = hmac.digest(_hkdf(file_key, b"", b"header"), text, "sha256")
    nonce = os.urandom(16)
    payload = _seal_payload(_hkdf(file_key, nonce, b"payload"), plaintext)
    binary = text + b" " + _b64(mac) + b"\n" + nonce + payload
    armored = base64.b64encode(binary)
    lines = [_ARMOR_BEGIN, *(line.decode() for line in _wrap_lines(armored)), _ARMOR_END]
    return "\n".join(lines) + "\n"


def _seal_payload(key: bytes, plaintext: bytes) -> bytes:
    aead = ChaCha20Poly1305(key)
    chunks = [plaintext[i : i + _CHUNK] for i in range(0, len(plaintext), _CHUNK)] or [b""]
    out = []
    for counter, chunk in enumerate(chunks):
        last = counter == len(chunks) - 1
        nonce = counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
        out.append(aead.encrypt(nonce, chunk, None))
    return b"".join(out)


def decrypt(armored: str, identities: list[Identity]) -> bytes:
    """The plaintext of an armored age file, with whichever identity it was made for."""
    lines = [line.strip() for line in armored.strip().splitlines()]
    if len(lines) < 3 or lines[0] != _ARMOR_BEGIN or lines[-1] != _ARMOR_END:
        raise AgeError("not an armored age file")
    try:
        binary = base64.b64decode("".join(lines[1:-1]), validate=True)
    except ValueError:
        raise AgeError("armored age file is not base64") from None
    header_end = binary.find(b"\n---")
    if header_end < 0:
        raise AgeError("age header has no end")
    mac_line_end = binary.find(b"\n", header_end + 4)
    if mac_line_end < 0:
        raise AgeError("age header has no MAC")
    header = binary[: header_end + 4]
    mac = _unb64(binary[header_end + 5 : mac_line_end])
    rest = binary[mac_line_end + 1 :]
    header_lines = header.split(b"\n")
    if header_lines[0] != VERSION_LINE:
        raise AgeError("not an age v1 file")
    file_key = _unwrap(header_lines[1:-1], identities)
    expected = hmac.digest(_hkdf(file_key, b"", b"header"), header, "sha256")
    if not hmac.compare_digest(mac, expected):
        raise AgeError("age header MAC does not match: the file was changed")
    nonce, payload = rest[:16], rest[16:]
    return _open_payload(_hkdf(file_key, nonce, b"payload"), payload)


def _unwrap(stanzas: list[bytes], identities: list[Identity]) -> bytes:
    position = 0
    while position < len(stanzas):
        arguments = stanzas[position].split(b" ")
        position += 1
        body = b""
        while position < len(stanzas) and not stanzas[position].startswith(b"->"):
            body += stanzas[position]
            position += 1
        if arguments[:2] != [b"->", b"X25519"] or len(arguments) != 3:
            continue
        share = _unb64(arguments[2])
        wrapped = _unb64(body)
        for identity in identities:
            own = identity.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            shared = identity.key.exchange(X25519PublicKey.from_public_bytes(share))
            wrap_key = _hkdf(shared, share + own, _X25519_INFO)
            try:
                return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, wrapped, None)
            except InvalidTag:
                continue
    raise AgeError("none of the given age identities can open this file")


def _open_payload(key: bytes, payload: bytes) -> bytes:
    aead = ChaCha20Poly1305(key)
    size = _CHUNK + 16
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    out = []
    for counter, chunk in enumerate(chunks):
        last = counter == len(chunks) - 1
        nonce = counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
        try:
            out.append(aead.decrypt(nonce, chunk, None))
        except InvalidTag:
            raise AgeError("age payload does not authenticate: the file was changed") from None
    return b"".join(out)
