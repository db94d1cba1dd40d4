"""What does signing cost the branch writer? The same single-file commits, unsigned and signed.

One run makes the same commits (one changed ConfigMap-sized file each, saved in batches of
256 as the writer saves) through our ``Mirror`` without a signer (the reference) and with an
ed25519, an ECDSA P-256 and an RSA 3072 signing key, each on a fresh mirror, best of three.
It prints commits/s and the ratio to unsigned, and checks that the ed25519 run ends on the
same commit id each time (its signatures are deterministic).

    python bench/signing.py [--commits 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit_reverser.encryption.sshsig import SigningKey  # noqa: E402
from audit_reverser.gitstore.repository import Mirror  # noqa: E402
from audit_reverser.gitstore.transport import LocalTransport  # noqa: E402
from audit_reverser.gitstore.types import FileChange, Identity  # noqa: E402

RUNS = 3
BATCH = 256
WHO = Identity(name="audit-reverser", email="audit-reverser@audit-reverser.invalid")
START = datetime(2026, 1, 1, tzinfo=UTC)


def _key(private: object) -> SigningKey:
    text = private.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return SigningKey.load(text, None, source="bench")


def _run(commits: int, signer: Callable[[bytes], bytes] | None) -> tuple[float, str | None]:
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as tmp:
        remote = Path(tmp) / "remote.git"
        mirror = Mirror(
            Path(tmp) / "mirror.git",
            LocalTransport(remote),
            "main",
            WHO,
            create_local_remote=True,
            signer=signer,
        )
        mirror.open()
        changes = [
            FileChange(
                path=f"live/v1/configmaps/ns{i % 20}/cm{i % 500}.yaml",
                content=f"apiVersion: v1\nkind: ConfigMap\ndata:\n  n: '{i}'\n".encode() * 20,
                message=f"[UPDATE] v1/configmaps/ns{i % 20}/cm{i % 500}\n\nAudit-ID: {i}\n",
                author=WHO,
                time=START + timedelta(seconds=i),
            )
            for i in range(commits)
        ]
        begin = time.perf_counter()
        for start in range(0, commits, BATCH):
            for change in changes[start : start + BATCH]:
                mirror.commit(change)
            mirror.save()
        elapsed = time.perf_counter() - begin
        return commits / elapsed, mirror.tip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=2000)
    args = parser.parse_args()
    keys = {
        "ed25519": _key(ed25519.Ed25519PrivateKey.generate()),
        "ecdsa-p256": _key(ec.generate_private_key(ec.SECP256R1())),
        "rsa-3072": _key(rsa.generate_private_key(public_exponent=65537, key_size=3072)),
    }
    results: dict[str, float] = {}
    tips: dict[str, set[str | None]] = {}
    for name, key in [("unsigned", None), *keys.items()]:
        runs = [_run(args.commits, key.sign if key else None) for _ in range(RUNS)]
        results[name] = max(rate for rate, _ in runs)
        tips[name] = {tip for _, tip in runs}
    print(f"{args.commits} single-file commits, batches of {BATCH}, best of {RUNS}")
    for name, rate in results.items():
        print(f"  {name:11} {rate:8.0f} commits/s  {rate / results['unsigned']:.2f} x unsigned")
    assert len(tips["ed25519"]) == 1, "ed25519-signed runs must give the same commit ids"
    assert len(tips["ecdsa-p256"]) == RUNS, "ECDSA signatures are randomized"
    print("  ed25519 runs end on one commit id; ECDSA runs on different ones (as documented)")


if __name__ == "__main__":
    main()
