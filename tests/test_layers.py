"""The layers stay one-way: lower packages never import higher ones, big libraries stay in
their one adapter."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "audit_reverser"

# Lowest first; a module may import its own layer and the layers before it.
LAYERS = [
    "context",
    "errors",
    "files",
    "events",
    "config",
    "encryption",
    "gitstore",
    "providers",
    "journal",
    "pipeline",
    "ingest",
    "cluster",
    "ha",
    "runtime",
    "metrics",
    "cli",
]
ADAPTERS = {
    "pygit2": "gitstore",
    "cryptography": "encryption",
    "kubernetes_asyncio": "cluster",
    "prometheus_client": "metrics",
    "redis": "ha",
}


def _layer(module: str) -> str:
    return module.removeprefix("audit_reverser.").split(".")[0]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_lower_layers_never_import_higher_ones() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).with_suffix("")
        own = relative.parts[0]
        if own not in LAYERS:
            continue
        for module in _imports(path):
            if module.startswith("audit_reverser."):
                other = _layer(module)
                if other in LAYERS and LAYERS.index(other) > LAYERS.index(own):
                    violations.append(f"{relative} imports {module}")
            root = module.split(".")[0]
            if root in ADAPTERS and own != ADAPTERS[root]:
                violations.append(f"{relative} imports {root} outside {ADAPTERS[root]}/")
    assert violations == []


def test_every_module_is_in_a_layer() -> None:
    modules = {
        p.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for p in PACKAGE.glob("*")
        if p.suffix == ".py" or p.is_dir()
    }
    assert modules - {"__init__", "__main__", "__pycache__"} <= set(LAYERS)
