"""Operator tooling that both ``make`` targets and the tests use (the rest of app/ never
imports it, and .dockerignore keeps it out of the app image): the port check before make run starts
(app/ops/ports.py), ``make status`` (app/ops/status.py), the lock files' check and
compiler (app/ops/lock.py) and the local Redis Cluster runner (app/ops/redis_cluster.py)."""
