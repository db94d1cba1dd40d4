"""The pipeline: filter, route, resolve, sanitize, and hand file changes to the Git writers."""
