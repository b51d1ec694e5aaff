"""``make status`` (``python -m app.ops.status``): is every process of a ``make run`` stack up?

Reads what ``make run`` reads: the environment with ``.env`` on top (``.env``
wins, as in make run and honcho) and make run's defaults. Prints one line per
process, then exits 1 when any of them is DOWN, 0 otherwise::

    OK    redis          redis://127.0.0.1:6390/0 role=master aof=on appendfsync=always ...
    (on a cluster, REDIS_CLUSTER=1 or REDIS_CLUSTER_NODES, a line per node instead:)
    OK    redis 127.0.0.1:7001  primary  slots=5461 replicas=1 appendfsync=always
    OK    redis 127.0.0.1:7004  replica of 127.0.0.1:7002 appendfsync=always
    OK    redis cluster  cluster_state=ok slots_ok=16384 known_nodes=6
    OK    app :8001      ready
    DOWN  app :8002      not answering: connection refused
    OK    nginx :8080    ready
    OK    mail worker    1 alive: host-4242 (sent=3 retries=0 dead=0 sessions=32)
    OK    mail backlog   pending=2 lag=0 retry=0 oldest=0.3s
    WARN  dead letters   2 in the partitions' md{P} streams (GET /admin/mail/dead lists them)
    OK    smtp           127.0.0.1:1025 accepts connections (dev sink)
    OK    mail metrics   http://127.0.0.1:9101/metrics

What each line checks:

* redis: PING, role (a replica cannot take the app's writes: DOWN), AOF and
  its last write (a failed AOF write makes Redis refuse writes: DOWN; no AOF at
  all: WARN), appendfsync, memory use and limit;
* app: ``GET /readyz`` on every instance, 127.0.0.1:APP_BASE_PORT ..
  APP_BASE_PORT+WEB_INSTANCES-1 (Redis answers, scripts loaded);
* nginx: ``GET /readyz`` through each listener (HTTP_PORT and the seed ports);
* mail worker: a live ``mail:worker:{name}:alive`` key (refreshed every few
  seconds by each worker); its backlog (app/mail_backlog.py) is the ``mailer``
  group's pending and lag on ``events`` (counted when Redis cannot say it,
  ``>=`` when the count stopped at its bound), the retry queue, and ``oldest``:
  how long the oldest completed order has waited for its mail to be accepted
  (WARN past a minute); dead letters are the partitions' ``md{P}`` streams (WARN: a
  person should look, nothing is down);
* smtp: a TCP connection to SMTP_HOST:SMTP_PORT (make run's dev sink when
  SMTP_HOST is unset); every live worker's metrics port when MAIL_METRICS_PORT
  is set.

``--json`` prints the same as one JSON object. Stdlib and redis-py only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from app import keys
from app.env import SettingsError, env_int
from app.mail_backlog import MailBacklog, read_mail_backlog
from app.ops.instances import instance_ports
from app.ops.ports import DEFAULTS as MAKE_RUN_DEFAULTS
from app.ops.redis_cluster import cluster_info, node_query, topology_from
from app.partitions import PARTITIONS
from app.redis_clients import cluster_options, redis_client
from app.settings import cluster_nodes_from_env

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 2.0

OK, DOWN, WARN, UNKNOWN = "OK", "DOWN", "WARN", "UNKNOWN"
# The oldest waiting confirmation older than this is a WARN (issue 16's lag target: 10 s p99).
MAIL_LAG_WARN_S = 60.0

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@dataclass(frozen=True)
class Check:
    state: str
    name: str
    detail: str


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as `. ./.env` in make run reads them (simple values only)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        match = _ENV_LINE.match(line)
        if match is None:
            continue
        name, raw = match.group(1), match.group(2).strip()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            value = raw[1:-1]
        else:
            value = raw.split(" #", 1)[0].strip()
        values[name] = value
    return values


def stack_env(environ: Mapping[str, str], env_file: Path | None) -> dict[str, str]:
    env = dict(environ)
    if env_file is not None:
        env.update(read_env_file(env_file))
    for name, default in MAKE_RUN_DEFAULTS.items():
        if not env.get(name, "").strip():
            env[name] = default
    if not env.get("REDIS_URL", "").strip():
        env["REDIS_URL"] = f"redis://127.0.0.1:{env['REDIS_PORT']}/0"
    if env.get("REDIS_CLUSTER", "").strip() == "1":
        # As make run: the local cluster's six nodes, whatever REDIS_CLUSTER_NODES says.
        base = _port(env, "REDIS_CLUSTER_BASE_PORT")
        env["REDIS_CLUSTER_NODES"] = ",".join(f"127.0.0.1:{base + i}" for i in range(6))
    return env


def cluster_nodes(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    try:
        return cluster_nodes_from_env(env)
    except SettingsError:  # a bad list: status says the cluster does not answer
        return ()


def redacted(url: str) -> str:
    """A Redis URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def _port(env: Mapping[str, str], name: str) -> int:
    try:
        return env_int(env, name, 0, 0, 65535)
    except SettingsError:  # the status of a stack with a bad port: that port is not checked
        return 0


def http_get(url: str) -> tuple[int | None, str]:
    """(status, error): status None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, ""
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (OSError, urllib.error.URLError) as error:
        reason = getattr(error, "reason", error)
        return None, str(reason.strerror if isinstance(reason, OSError) else reason)


def check_readyz(name: str, base: str) -> Check:
    status, error = http_get(f"{base}/readyz")
    if status == 200:
        return Check(OK, name, "ready")
    if status is None:
        return Check(DOWN, name, f"not answering: {error or 'no answer'}")
    return Check(DOWN, name, f"/readyz answered {status}")


def check_tcp(name: str, host: str, port: int, note: str = "") -> Check:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            pass
    except OSError as error:
        return Check(DOWN, name, f"{host}:{port} not reachable: {error.strerror or error}")
    return Check(OK, name, f"{host}:{port} accepts connections{note}")


def check_cluster(nodes: tuple[tuple[str, int], ...]) -> list[Check]:
    """A Redis Cluster (REDIS_CLUSTER_NODES): one line per node with its role, as the
    first node that answers sees the cluster, then the cluster's own state. A node
    marked failing, or a primary without a replica (its writes are refused:
    min-replicas-to-write), is DOWN."""
    for host, port in nodes:
        view, info = topology_from(port, host), cluster_info(port, host)
        if view is not None and info is not None:
            break
    else:
        seeds = ",".join(f"{host}:{port}" for host, port in nodes)
        return [Check(DOWN, "redis cluster", f"no node of {seeds} answers")]
    checks = []
    addresses = {node.node_id: node.address for node in view.nodes}
    for node in sorted(view.nodes, key=lambda n: (n.role != "primary", n.host, n.port)):
        fsync = node_query(node.port, "CONFIG", "GET", "appendfsync", host=node.host)
        detail = f"appendfsync={fsync.get('appendfsync', '?') if isinstance(fsync, dict) else '?'}"
        if node.role == "primary":
            replicas = view.replicas_of(node)
            state = OK if replicas else DOWN
            detail = f"primary  slots={node.slot_count} replicas={len(replicas)} {detail}" + (
                "" if replicas else ": no replica, so writes are refused"
            )
        else:
            state = OK
            detail = f"replica of {addresses.get(node.primary_id or '', '?')} {detail}"
        if node.failed or not (node.connected or "myself" in node.flags):
            state, detail = DOWN, f"{detail}: marked {','.join(sorted(node.flags))}"
        checks.append(Check(state, f"redis {node.address}", detail))
    cluster_state = info.get("cluster_state", "?")
    checks.append(
        Check(
            OK if cluster_state == "ok" else DOWN,
            "redis cluster",
            f"cluster_state={cluster_state} slots_ok={info.get('cluster_slots_ok', '?')}"
            f" known_nodes={info.get('cluster_known_nodes', '?')}",
        )
    )
    return checks


def check_redis(client: redis.Redis, url: str) -> Check:
    """DOWN with "not answering" when nothing answered; see the module docstring."""
    try:
        client.ping()
        replication = client.info("replication")
        persistence = client.info("persistence")
        memory = client.info("memory")
    except RedisError as error:
        return Check(DOWN, "redis", f"{redacted(url)} not answering: {error}")
    try:
        appendfsync = client.config_get("appendfsync").get("appendfsync", "?")
    except ResponseError:  # CONFIG renamed or refused
        appendfsync = "?"
    role = replication.get("role", "?")
    aof = int(persistence.get("aof_enabled", 0)) == 1
    last_write = persistence.get("aof_last_write_status", "?")
    detail = (
        f"{redacted(url)} role={role} aof={'on' if aof else 'off'} appendfsync={appendfsync}"
        f" aof_last_write={last_write} rdb_last_bgsave={persistence.get('rdb_last_bgsave_status', '?')}"
        f" memory={memory.get('used_memory_human', '?')}"
        f" (maxmemory {memory.get('maxmemory_human', '?')}, {memory.get('maxmemory_policy', '?')})"
    )
    if int(persistence.get("loading", 0)) == 1:
        return Check(DOWN, "redis", detail + ": still loading its data")
    if role != "master":
        return Check(DOWN, "redis", detail + ": a replica cannot take the app's writes")
    if aof and last_write != "ok":
        return Check(DOWN, "redis", detail + ": the last AOF write failed, writes are refused")
    if not aof:
        return Check(WARN, "redis", detail + ": no AOF, acknowledged orders can be lost")
    return Check(OK, "redis", detail)


def read_backlog(url: str, nodes: tuple[tuple[str, int], ...] = ()) -> MailBacklog | None:
    """app/mail_backlog.py over its own (asyncio) client: the worker's figures."""

    async def read() -> MailBacklog | None:
        client = redis_client(
            url,
            nodes,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            decode_responses=True,
        )
        try:
            return await read_mail_backlog(client)
        finally:
            await client.aclose()

    return asyncio.run(read())


def check_mail(
    client: redis.Redis | redis.cluster.RedisCluster,
    url: str,
    nodes: tuple[tuple[str, int], ...] = (),
) -> list[Check]:
    """The workers' health keys, the group's backlog and lag, the dead letters."""
    try:
        alive = {}
        for key in client.scan_iter(match=keys.mail_worker_alive("*"), count=1000):
            value = client.get(key)
            if value is not None:
                alive[key.removeprefix("mail:worker:").removesuffix(":alive")] = value
        backlog = read_backlog(url, nodes)
        # The retry queues and dead letters of every partition, in one pipeline.
        pipe = client.pipeline(transaction=False)
        for partition in range(PARTITIONS):
            pipe.zcard(keys.mail_retry(partition))
            pipe.xlen(keys.mail_dead(partition))
        counts = pipe.execute()
        retrying, dead = sum(counts[0::2]), sum(counts[1::2])
    except RedisError as error:
        return [Check(UNKNOWN, "mail worker", f"cannot tell: Redis error {error}")]
    checks = []
    if alive:
        described = []
        for name, raw in sorted(alive.items()):
            try:
                stats = json.loads(raw)
                described.append(
                    f"{name} (sent={stats.get('sent', 0)} retries={stats.get('retries', 0)}"
                    f" dead={stats.get('dead', 0)} sessions={stats.get('sessions', '?')})"
                )
            except ValueError:
                described.append(name)
        checks.append(Check(OK, "mail worker", f"{len(alive)} alive: " + ", ".join(described)))
    else:
        checks.append(
            Check(DOWN, "mail worker", "no live worker (no fresh mail:worker:*:alive key)")
        )
    if backlog is None:
        checks.append(
            Check(OK, "mail backlog", f"no {keys.MAIL_GROUP} group yet; retry={retrying}")
        )
    else:
        # lag: the oldest completed order whose mail no server accepted yet.
        now_ms = time.time_ns() // 1_000_000
        late = backlog.oldest_age_s(now_ms) > MAIL_LAG_WARN_S
        checks.append(Check(WARN if late else OK, "mail backlog", backlog.describe(now_ms)))
    if dead:
        checks.append(
            Check(
                WARN,
                "dead letters",
                f"{dead} in the partitions' md{{P}} streams (GET /admin/mail/dead lists them)",
            )
        )
    else:
        checks.append(Check(OK, "dead letters", "none"))
    return checks


def metrics_ports(client: redis.Redis) -> list[int]:
    """The metrics ports the live workers took (in their health keys)."""
    ports = set()
    for key in client.scan_iter(match=keys.mail_worker_alive("*"), count=1000):
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            port = int(json.loads(client.get(key) or "{}").get("metrics_port") or 0)
            if port:
                ports.add(port)
    return sorted(ports)


def _cluster_client(
    nodes: tuple[tuple[str, int], ...], url: str
) -> redis.cluster.RedisCluster | None:
    """redis-py's cluster client (it asks for the slot map at once); None if it cannot."""
    try:
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in nodes],
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            decode_responses=True,
            **cluster_options(url),
        )
    except (RedisError, RedisClusterException):
        return None


def run_checks(env: Mapping[str, str]) -> list[Check]:
    url = env["REDIS_URL"]
    checks: list[Check] = []
    nodes = cluster_nodes(env)
    client: redis.Redis | redis.cluster.RedisCluster | None
    if nodes:
        checks += check_cluster(nodes)
        client = _cluster_client(nodes, url) if checks[-1].state == OK else None
        redis_answers = client is not None
    else:
        client = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, decode_responses=True
        )
        checks.append(check_redis(client, url))
        redis_answers = "not answering" not in checks[-1].detail
    worker_ports: list[int] = []
    try:
        for port in instance_ports(env):
            checks.append(check_readyz(f"app :{port}", f"http://127.0.0.1:{port}"))
        for name in ("HTTP_PORT", "SEED_PHONES_PORT", "SEED_ORDERS_PORT"):
            port = _port(env, name)
            if port:
                checks.append(check_readyz(f"nginx :{port}", f"http://127.0.0.1:{port}"))
        if redis_answers:
            checks += check_mail(client, url, nodes)
            with contextlib.suppress(RedisError):
                worker_ports = metrics_ports(client)
        else:
            checks.append(Check(UNKNOWN, "mail worker", "cannot tell: Redis is down"))
    finally:
        if client is not None:
            client.close()
    smtp_host = env.get("SMTP_HOST", "").strip()
    checks.append(
        check_tcp(
            "smtp",
            smtp_host or "127.0.0.1",
            _port(env, "SMTP_PORT"),
            "" if smtp_host else " (dev sink)",
        )
    )
    metrics_port = _port(env, "MAIL_METRICS_PORT")
    if metrics_port:
        # Each live worker's port (several workers take MAIL_METRICS_PORT and up);
        # with none alive, the configured one, which then cannot answer.
        urls = [f"http://127.0.0.1:{port}/metrics" for port in worker_ports or [metrics_port]]
        failed = []
        for metrics_url in urls:
            status, error = http_get(metrics_url)
            if status != 200:
                failed.append(f"{metrics_url}: {error or status}")
        checks.append(
            Check(DOWN, "mail metrics", "; ".join(failed))
            if failed
            else Check(OK, "mail metrics", " ".join(urls))
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.ops.status", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--env-file",
        default=str(ROOT / ".env"),
        help="read on top of the environment, as make run does (default: .env of the repo)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)
    env = stack_env(os.environ, Path(args.env_file) if args.env_file else None)
    checks = run_checks(env)
    down = [check for check in checks if check.state in (DOWN, UNKNOWN)]
    if args.json:
        print(json.dumps({"ok": not down, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            print(f"{check.state:<8}{check.name:<{width + 2}}{check.detail}")
        print()
        print(f"{len(down)} of {len(checks)} down" if down else f"all {len(checks)} up")
    return 1 if down else 0


if __name__ == "__main__":
    sys.exit(main())
