"""Configuration: the seed's custom resources, read from YAML files (later: from the cluster)."""

from audit_reverser.config.loader import load_config
from audit_reverser.config.model import Config

__all__ = ["Config", "load_config", "load_default_config"]


def load_default_config() -> Config:
    """The embedded default: every write except known noise into ./audit-repo.git."""
    from importlib.resources import as_file, files

    with as_file(files("audit_reverser.config") / "default.yaml") as path:
        return load_config([path])
