"""Where events come in: the webhook receiver (HTTP) and audit log files (replay)."""
