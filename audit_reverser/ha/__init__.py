"""High availability on Valkey/Redis: a shared durable journal (a Stream per writer lane,
read through a consumer group) and one fenced writer per repository branch (a lease key).

redis-py is imported only in this package; the rest of the code sees our types and errors.
"""
