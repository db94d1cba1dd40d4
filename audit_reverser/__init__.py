"""audit-reverser: Kubernetes audit events in, attributed YAML commits in Git out."""

__version__ = "0.1.0"
