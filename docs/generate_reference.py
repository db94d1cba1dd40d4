"""Write docs/reference.md, the configuration reference, from the CRD schemas in deploy/base/crds/.

    python docs/generate_reference.py          # rewrite docs/reference.md
    python docs/generate_reference.py --check  # exit 1 when it is out of date (tests run this)

Every field comes from the schema (type, required, default, allowed values, description);
NOTES adds what audit-reverser does with a field where the schema alone would mislead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "deploy" / "base" / "crds"
OUTPUT = ROOT / "docs" / "reference.md"
ORDER = ("GitProvider", "GitTarget", "WatchRule", "ClusterWatchRule")

# How audit-reverser reads a field, where that is more than its schema says.
NOTES = {
    ("GitProvider", "spec.url"): "SSH (`git@host:owner/repo.git`, `ssh://`), HTTPS, or a local "
    "path / `file://` URL of a bare repository.",
    ("GitProvider", "spec.allowedBranches"): "Globs; a GitTarget whose branch matches none is "
    "not ready (`BranchNotAllowed`) and left out; the other targets keep working.",
    ("GitProvider", "spec.secretRef"): "Keys as Flux names them: `ssh-privatekey` (+ "
    "`passphrase`) and `known_hosts` for SSH; `username` + `password`, or `token`, (+ `ca.crt`) "
    "for HTTPS; Flux's `identity`, `password` (the key's passphrase) and `bearerToken` too. "
    "Required for SSH (host keys are always verified). `signingKey` (an OpenSSH private key, "
    "+ `signingKeyPassphrase`) signs every commit; `committerName` + "
    "`committerEmail` set the committer (see remotes.md, Signed commits).",
    ("GitProvider", "spec.push.interval"): "A Go duration (`5s`, `1m30s`); default 60 s.",
    ("GitProvider", "spec.push.maxCommits"): "Default 20.",
    ("GitTarget", "spec.providerRef.kind"): "Implemented, despite the seed's note: "
    "`GitProvider`, or `GitRepository` with `group: "
    "source.toolkit.fluxcd.io` for a Flux GitRepository in the same namespace (URL and Secret "
    "from it, push settings the defaults, any branch allowed: see remotes.md, Flux "
    "GitRepository); anything else is refused with this field named.",
    ("GitTarget", "spec.path"): "A relative folder with `/` separators (empty: the repository "
    "root); absolute paths, `.` and `..` are refused. Events of a named cluster may go to "
    "`<path>/<cluster>/` (fleet.md).",
    ("GitTarget", "spec.encryption"): "Secrets are written only SOPS-encrypted "
    "(`{name}.sops.yaml`); a target without working encryption refuses Secrets.",
    ("GitTarget", "spec.encryption.age.recipients.generateWhenMissing"): "In cluster mode the "
    "key is stored in the `secretRef` Secret (RBAC: `audit-reverser-keys`); with `--config` "
    "under `--state-dir/encryption/keys/`. Back it up: see operations.md.",
    ("ClusterWatchRule", "spec.rules[].scope"): "Required by audit-reverser: `Cluster` selects "
    "cluster-scoped types, `Namespaced` namespaced ones in every namespace.",
}


def _type(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "object")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    return str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    parts = []
    if "default" in schema:
        parts.append(
            f"default `{yaml.safe_dump(schema['default']).strip().removesuffix('...').strip()}`"
        )
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (("minimum", "≥"), ("maximum", "≤"), ("minLength", "length ≥")):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    if "format" in schema:
        parts.append(f"format {schema['format']}")
    return "; ".join(parts)


def _text(description: str) -> str:
    return " ".join(description.split()).replace("|", "\\|")


def _rows(
    kind: str, schema: dict[str, Any], path: str, required: bool, used: set[tuple[str, str]]
) -> list[str]:
    rows = []
    description = _text(schema.get("description", ""))
    note = NOTES.get((kind, path))
    used.add((kind, path))
    if note:
        description = f"{description} *audit-reverser:* {note}".strip()
    rows.append(
        f"| `{path}` | {_type(schema)} | {'yes' if required else ''} | "
        f"{_constraints(schema)} | {description} |"
    )
    children = schema.get("properties")
    prefix = path
    if schema.get("type") == "array" and "properties" in schema.get("items", {}):
        children = schema["items"]["properties"]
        prefix = f"{path}[]"
        schema = schema["items"]
    for name, child in (children or {}).items():
        rows += _rows(kind, child, f"{prefix}.{name}", name in schema.get("required", ()), used)
    return rows


def render() -> str:
    crds = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = (path, crd)
    used: set[tuple[str, str]] = set()
    out = [
        "# Configuration reference",
        "",
        "Generated by `python docs/generate_reference.py` from the CRD schemas in",
        "[`deploy/base/crds/`](../deploy/base/crds/) — edit those (or the notes in the",
        "generator), not this file. The same fields are read from the cluster (`serve",
        "--in-cluster`) and from YAML files (`--config`); audit-reverser refuses unknown fields",
        "and wrong types, naming the file, the document and the field.",
        "",
    ]
    for kind in ORDER:
        path, crd = crds[kind]
        [version] = crd["spec"]["versions"]
        schema = version["schema"]["openAPIV3Schema"]
        scope = crd["spec"]["scope"]
        out += [
            f"## {kind}",
            "",
            f"`{crd['spec']['group']}/{version['name']}`, {scope.lower()}"
            f" ([`{path.name}`](../deploy/base/crds/{path.name})). "
            + _text(schema.get("description", "")),
            "",
            "| field | type | required | constraints | description |",
            "|---|---|---|---|---|",
        ]
        spec = schema["properties"]["spec"]
        for name, child in spec.get("properties", {}).items():
            out += _rows(kind, child, f"spec.{name}", name in spec.get("required", ()), used)
        out += [
            "",
            "`status` is written by audit-reverser (see "
            "[cluster.md](cluster.md#status-on-the-custom-resources)).",
            "",
        ]
    stale = set(NOTES) - used
    if stale:  # a field was renamed or removed in the CRDs
        raise SystemExit(f"NOTES name fields the CRDs do not have: {sorted(stale)}")
    return "\n".join(out)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(
                f"{OUTPUT} is out of date: run python docs/generate_reference.py", file=sys.stderr
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
