"""Operator tooling that both ``make`` targets and the tests use (never imported by
app/, and not part of the app image): the port check before make run starts
(ops/ports.py), ``make status`` (ops/status.py), the lock files' check and
compiler (ops/lock.py) and the local Redis Cluster runner (ops/redis_cluster.py)."""
