"""Settings read once from the environment into one frozen, validated object.

Every default here is mirrored in ``.env.example``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from app.env import SettingsError, env_bool, env_float, env_int

# What may follow "Bearer " (RFC 6750's b64token, at most 512 characters):
# app/auth.py parses headers with it, so an ADMIN_TOKEN outside it never matches.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{1,512}=*")


def secret(env: Mapping[str, str], name: str) -> str:
    """NAME from the environment, or the contents of the file NAME_FILE names.

    The file form is for Docker secrets: a secret in a plain environment
    variable shows in `docker inspect` and in every child's environment.
    """
    path = env.get(f"{name}_FILE", "").strip()
    if not path:
        return env.get(name, "").strip()
    if env.get(name, "").strip():
        raise SettingsError(f"set {name} or {name}_FILE, not both")
    try:
        return Path(path).read_text().strip()
    except OSError as error:
        raise SettingsError(f"{name}_FILE: cannot read {path}: {error.strerror}") from None


def redis_url_from_env(env: Mapping[str, str], default: str) -> str:
    """REDIS_URL (or the default), with the password of REDIS_PASSWORD_FILE when set.

    Only the file form: a REDIS_PASSWORD left in .env for compose must not
    make `make run`'s password-less redis refuse the app.
    """
    redis_url = env.get("REDIS_URL", "").strip() or default
    parts = urlsplit(redis_url)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise SettingsError(
            f"REDIS_URL must be a redis://, rediss:// or unix:// URL, got {redis_url!r}"
        )
    path = env.get("REDIS_PASSWORD_FILE", "").strip()
    if not path:
        return redis_url
    try:
        password = Path(path).read_text().strip()
    except OSError as error:
        raise SettingsError(f"REDIS_PASSWORD_FILE: cannot read {path}: {error.strerror}") from None
    if not password or parts.scheme == "unix" or parts.password is not None:
        raise SettingsError(
            "REDIS_PASSWORD_FILE needs a non-empty file and a redis:// URL without a password"
        )
    host = parts.netloc.rsplit("@", 1)[-1]
    user = quote(parts.username, safe="") if parts.username else ""
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def cluster_nodes_from_env(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """REDIS_CLUSTER_NODES, ``host:port,...``: where a Redis Cluster client starts
    (it learns every other node from them). Empty: one redis-server at REDIS_URL."""
    raw = env.get("REDIS_CLUSTER_NODES", "").strip()
    nodes = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SettingsError(
                f"REDIS_CLUSTER_NODES must be host:port,... with ports 1 to 65535, got {item!r}"
            )
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)


def redacted_url(url: str) -> str:
    """A Redis URL without its password, for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# Where SAGA_FAULT_POINT may kill a worker: after the reserves answered, after the commit
# answered, after a cancel's refund answered (app/orders/saga_service.py); after a grant's
# reserve answered, after its receipt answered (app/orders/grants.py).
# "closed": a recall's stripes closed, their shipments not yet received (docs/escrow.md 8).
SAGA_FAULT_POINTS = ("reserved", "committed", "refunded", "closed", "granted", "received")
# The longest SAGA_RESERVATION_TTL_MS any app may run with: an order's reserve and commit
# are refused past its reservation's expiry, so an abort marker or release tombstone kept
# this long (plus a margin) outlives every late step of its order (app/orders/saga.py).
RESERVATION_TTL_MAX_MS = 600_000


def _fault_point(env: Mapping[str, str]) -> str:
    point = env.get("SAGA_FAULT_POINT", "").strip()
    if point and point not in SAGA_FAULT_POINTS:
        raise SettingsError(f"SAGA_FAULT_POINT must be one of {', '.join(SAGA_FAULT_POINTS)}")
    return point


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6390/0"
    # Socket and connect timeouts of every Redis call: past them a request gets 503.
    redis_timeout: float = 2.0
    redis_max_connections: int = 64
    # A Redis Cluster's start-up nodes (docs/data-tier.md); empty: the one redis-server
    # of redis_url. The cluster uses redis_url's password and TLS, not its address.
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    # Acknowledged on a cluster means the primary's replica has the write too
    # (docs/data-tier.md, section 6): every script is followed by WAIT <replicas> <ms>
    # on its connection, and fewer replicas than this answer 503 write_unconfirmed.
    # 0 (the default on one redis-server) sends no WAIT; 1 is the cluster's default.
    redis_wait_replicas: int = 0
    redis_wait_ms: int = 500
    admin_token: str = ""
    # Concurrent requests one worker ever serves: the ceiling of the adaptive limit.
    max_inflight: int = 256
    # Overload control (app/overload.py), per worker. Off: a fixed cap at
    # MAX_INFLIGHT and no queue-time refusals (the before of an A/B).
    overload_adaptive: bool = True
    # The floor of the adaptive limit: above what nginx's cap (UPSTREAM_MAX_CONNS,
    # 32 per instance) can hand one worker, new orders' share (80%) included.
    # Below it, each request the worker refuses frees a slot nginx refills at
    # once: with the CPU saturated (latency up, limit down) the worker spent its
    # CPU refusing (37,000 refusals, 3x goodput 206/s in one run; 0 and
    # 1,314/s with 40, an A/B in one make bench run). Directly reached workers (no
    # nginx) want a lower floor (tests set 4).
    overload_min_limit: int = 40
    # The limit shrinks when the p90 latency of a window exceeds this many times
    # the no-load latency; the queue-time target is the same multiple of it.
    overload_latency_tolerance: float = 2.0
    overload_window_ms: int = 100
    # CoDel: the floor of the queue-time target, and how long waits must stay
    # above it before requests are refused for waiting (a burst drains sooner).
    overload_queue_target_min_ms: int = 5
    overload_queue_interval_ms: int = 100
    idempotency_ttl_seconds: int = 24 * 3600
    # Serve GET /bench/hello, the bench's ceiling route; off in production.
    bench_routes: bool = False
    # Take the X-Request-ID that nginx in front of us sets; when off, every
    # request gets an id made here, whatever the client sent.
    behind_proxy: bool = True
    # Write the metric updates and access lines of one event-loop turn together
    # (app/metrics.py, app/logs.py); 0 writes each at once, for A/B runs.
    observe_batching: bool = True
    # The longest an app may take from its reserves to its commit before the settler
    # may fence the order and release its stock (docs/data-tier.md, 3.2).
    reservation_ttl_ms: int = 10_000
    # Test-only: the worker SIGKILLs itself right after this saga step (one of
    # SAGA_FAULT_POINTS), so the crash-point tests kill it exactly there. Empty: never.
    saga_fault_point: str = ""
    # Test-only: every order and cancel takes the split saga (reserve, commit, settle)
    # even where one node serves all its partitions, as on one redis-server, where it
    # would collapse into one script (app/orders/saga_service.py); so the split saga's
    # steps and crash points can be tested there.
    saga_always_split: bool = False
    # Escrow's striping rule (docs/escrow.md, section 4): a phone hot and deep enough is
    # set striped by its reserves, and its pool then grants stripes to the other primaries.
    # On: it is what lets a cluster's tier scale (section 9, docs/BENCH.md). Off, no phone
    # is ever striped and every order whose customer and phone are apart takes the saga.
    # Nothing changes on one redis-server, where every order is one script anyway.
    escrow_stripes: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        redis_url = redis_url_from_env(env, cls.redis_url)
        admin_token = secret(env, "ADMIN_TOKEN")
        if not admin_token:
            raise SettingsError("ADMIN_TOKEN is required (make run generates one into .env)")
        if len(admin_token) < 16:
            raise SettingsError("ADMIN_TOKEN must be at least 16 characters")
        if BEARER_TOKEN.fullmatch(admin_token) is None:
            # The token itself is a secret: say what is wrong, never echo it.
            raise SettingsError(
                "ADMIN_TOKEN can never authenticate: it may hold only letters, digits and "
                "- . _ ~ + / (then optional = padding), at most 512 of them (RFC 6750 b64token); "
                "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        redis_timeout = env_float(env, "REDIS_TIMEOUT", cls.redis_timeout, 0.05, 60.0)
        cluster_nodes = cluster_nodes_from_env(env)
        if cluster_nodes and urlsplit(redis_url).scheme == "unix":
            # The cluster takes REDIS_URL's password and TLS; a socket path says neither.
            raise SettingsError("REDIS_CLUSTER_NODES needs a redis:// or rediss:// REDIS_URL")
        wait_replicas = env_int(env, "REDIS_WAIT_REPLICAS", 1 if cluster_nodes else 0, 0, 16)
        if wait_replicas and not cluster_nodes:
            # One redis-server has no replica to wait for: its promise is its own AOF.
            raise SettingsError(
                "REDIS_WAIT_REPLICAS needs REDIS_CLUSTER_NODES (0 on one redis-server)"
            )
        wait_ms = env_int(env, "REDIS_WAIT_MS", cls.redis_wait_ms, 1, 60_000)
        if wait_replicas and wait_ms >= redis_timeout * 1000:
            # Else the socket times out first, and a slow replica reads as a dead primary.
            raise SettingsError(
                f"REDIS_WAIT_MS ({wait_ms}) must be below REDIS_TIMEOUT ({redis_timeout} s)"
            )
        return cls(
            redis_url=redis_url,
            redis_timeout=redis_timeout,
            redis_cluster_nodes=cluster_nodes,
            redis_wait_replicas=wait_replicas,
            redis_wait_ms=wait_ms,
            redis_max_connections=env_int(
                env, "REDIS_MAX_CONNECTIONS", cls.redis_max_connections, 1, 10_000
            ),
            admin_token=admin_token,
            max_inflight=env_int(env, "MAX_INFLIGHT", cls.max_inflight, 1, 100_000),
            overload_adaptive=env_bool(env, "OVERLOAD_ADAPTIVE", cls.overload_adaptive),
            overload_min_limit=env_int(
                env, "OVERLOAD_MIN_LIMIT", cls.overload_min_limit, 1, 100_000
            ),
            overload_latency_tolerance=env_float(
                env, "OVERLOAD_LATENCY_TOLERANCE", cls.overload_latency_tolerance, 1.1, 100.0
            ),
            overload_window_ms=env_int(
                env, "OVERLOAD_WINDOW_MS", cls.overload_window_ms, 10, 60_000
            ),
            overload_queue_target_min_ms=env_int(
                env, "OVERLOAD_QUEUE_TARGET_MIN_MS", cls.overload_queue_target_min_ms, 1, 60_000
            ),
            overload_queue_interval_ms=env_int(
                env, "OVERLOAD_QUEUE_INTERVAL_MS", cls.overload_queue_interval_ms, 1, 60_000
            ),
            idempotency_ttl_seconds=env_int(
                env, "IDEMPOTENCY_TTL_SECONDS", cls.idempotency_ttl_seconds, 1, 30 * 24 * 3600
            ),
            bench_routes=env_bool(env, "BENCH_ROUTES", cls.bench_routes),
            behind_proxy=env_bool(env, "BEHIND_PROXY", cls.behind_proxy),
            observe_batching=env_bool(env, "OBSERVE_BATCHING", cls.observe_batching),
            reservation_ttl_ms=env_int(
                env, "SAGA_RESERVATION_TTL_MS", cls.reservation_ttl_ms, 100, RESERVATION_TTL_MAX_MS
            ),
            saga_fault_point=_fault_point(env),
            saga_always_split=env_bool(env, "SAGA_ALWAYS_SPLIT", cls.saga_always_split),
            escrow_stripes=env_bool(env, "ESCROW_STRIPES", cls.escrow_stripes),
        )

    def __repr__(self) -> str:
        # Never let the admin token or the Redis password reach a log through a repr.
        return f"Settings(redis_url={redacted_url(self.redis_url)!r}, redis_cluster_nodes={self.redis_cluster_nodes!r}, max_inflight={self.max_inflight}, admin_token=<hidden>)"
