"""Render nginx/nginx.conf.template into a complete nginx.conf (stdlib only).

    python -m nginx.render --out var/nginx/nginx.conf     # make run: from the environment
    python -m nginx.render --compose --out nginx/compose.conf   # the compose stack's copy

Environment (defaults in brackets, all documented in .env.example):
    HTTP_PORT [8080]          the whole API; 0 turns it off
    SEED_PHONES_PORT [5555]   the seed's phones service: /phones, /phones/... ; 0 = off
    SEED_ORDERS_PORT [7777]   the seed's orders service: /orders..., /phones/check/{id}; 0 = off
    WEB_INSTANCES [2], APP_BASE_PORT [8001]   the upstream instances (see app/ops/instances.py)
    LIMIT_WRITE_RATE [20r/s], LIMIT_WRITE_BURST [40]    POST/PATCH/PUT/DELETE, per token or address
    LIMIT_READ_RATE [200r/s], LIMIT_READ_BURST [400]    everything else
    LIMIT_ADDRESS_RATE, LIMIT_ADDRESS_BURST [twice the read ones]   per address, any token
    LIMIT_CONN [200]          open connections per client address
    UPSTREAM_MAX_FAILS [3], UPSTREAM_FAIL_TIMEOUT [5s]  passive health checks
    AUDIT_READ_TIMEOUT [300s]  how long nginx waits for GET /admin/audit's answer
    NGINX_WORKER_PROCESSES [auto]

Every error nginx itself produces gets an RFC 9457 problem+json body with the
same ``type`` base and fields as the app's (app/problems.py); no HTML page ever
reaches a client.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.ops.instances import instance_ports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEMPLATE = HERE / "nginx.conf.template"
COMPOSE_CONF = HERE / "compose.conf"
PROBLEM_TYPE_BASE = "https://phoneshop.example/problems/"

# In the compose stack the app service answers on this port inside the network.
COMPOSE_UPSTREAM = "app:8000"
COMPOSE_MAIL_UI = "mailpit:8025"
# Docker's embedded DNS server, inside every compose network.
COMPOSE_RESOLVER = "127.0.0.11"

RATE_RE = re.compile(r"^([1-9][0-9]{0,6})(?:r/([sm]))?$")
DURATION_RE = re.compile(r"^[1-9][0-9]{0,5}(?:ms|s|m)?$")


class RenderError(ValueError):
    """The environment holds a value nginx cannot be configured with."""


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise RenderError(f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return int(raw)


def _rate(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    match = RATE_RE.match(raw)
    if match is None:
        raise RenderError(f"{name} must look like 20r/s, 600r/m or 20, got {raw!r}")
    return f"{match.group(1)}r/{match.group(2) or 's'}"


def _duration(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if DURATION_RE.match(raw) is None:
        raise RenderError(f"{name} must be an nginx duration like 5s or 500ms, got {raw!r}")
    return raw


@dataclass(frozen=True)
class NginxConfig:
    """Everything the template needs; ``from_env`` reads it, tests build it directly."""

    upstreams: Sequence[str] = ("127.0.0.1:8001", "127.0.0.1:8002")
    listen_host: str = "127.0.0.1"  # "" listens on every address (the container)
    http_port: int = 8080
    seed_phones_port: int = 5555
    seed_orders_port: int = 7777
    limit_write_rate: str = "20r/s"
    limit_write_burst: int = 40
    limit_read_rate: str = "200r/s"
    limit_read_burst: int = 400
    # Every request of one client address, whatever its token says; "" / None:
    # twice a token's read budget (see address_rate, address_burst).
    limit_address_rate: str = ""
    limit_address_burst: int | None = None
    limit_conn: int = 200
    max_fails: int = 3
    fail_timeout: str = "5s"
    # Requests in progress at one instance, over all nginx workers (a shared
    # zone), WebSockets apart (0 = no cap). Past it nginx answers 503 at once,
    # in microseconds. The app cannot take more than a few dozen at once
    # usefully: every request beyond that only waits in its socket, and is
    # refused (or served) seconds late. Measured at 3x capacity, 2 instances
    # x 1 worker: 256 -> refusals p99 4.5 s, goodput 42% of capacity; 32 ->
    # refusals p99 38 ms, goodput 96% (docs in /work/notes, overflow-control).
    max_conns: int = 32
    # GET /admin/audit answers only once it has recounted every row: 10 s at
    # 1M orders on a quiet box, 68.5 s on a loaded one under 2,000 orders/s
    # (/work/notes/review-b.md). The 30 s of every other location would cut
    # it off and retry it on the other instance (a second audit); its own
    # location waits this long and never retries.
    audit_read_timeout: str = "300s"
    worker_processes: str = "auto"
    var_dir: str = "var/nginx"  # pid and temp files
    access_log: str = "var/log/nginx-access.log"
    error_log: str = "stderr"
    # Compose only: nginx also fronts Mailpit's web UI, so that nginx stays the
    # one service publishing ports. "" / 0 = no such server.
    mail_ui_upstream: str = ""
    mail_ui_port: int = 0
    # Compose only: the DNS server that `server app:8000 resolve` asks again
    # and again, so that `--scale app=N` is followed without a reload (nginx
    # >= 1.27.3). "" (make run, Debian's nginx 1.22): the addresses are fixed
    # when nginx loads its config, as they are for 127.0.0.1 ports.
    resolver: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> NginxConfig:
        env = os.environ if env is None else env
        workers = env.get("NGINX_WORKER_PROCESSES", "").strip() or "auto"
        if workers != "auto" and not (workers.isascii() and workers.isdigit() and int(workers) > 0):
            raise RenderError(f"NGINX_WORKER_PROCESSES must be auto or a count, got {workers!r}")

        def set_(suffix: str) -> bool:
            return bool(env.get(f"LIMIT_ADDRESS_{suffix}", "").strip())

        config = cls(
            upstreams=tuple(f"127.0.0.1:{port}" for port in instance_ports(env)),
            http_port=_int(env, "HTTP_PORT", 8080, 0, 65535),
            seed_phones_port=_int(env, "SEED_PHONES_PORT", 5555, 0, 65535),
            seed_orders_port=_int(env, "SEED_ORDERS_PORT", 7777, 0, 65535),
            limit_write_rate=_rate(env, "LIMIT_WRITE_RATE", "20r/s"),
            limit_write_burst=_int(env, "LIMIT_WRITE_BURST", 40, 0, 1_000_000),
            limit_read_rate=_rate(env, "LIMIT_READ_RATE", "200r/s"),
            limit_read_burst=_int(env, "LIMIT_READ_BURST", 400, 0, 1_000_000),
            # Unset: derived from the read limits (NginxConfig.address_rate/_burst).
            limit_address_rate=_rate(env, "LIMIT_ADDRESS_RATE", "") if set_("RATE") else "",
            limit_address_burst=(
                _int(env, "LIMIT_ADDRESS_BURST", 0, 0, 2_000_000) if set_("BURST") else None
            ),
            limit_conn=_int(env, "LIMIT_CONN", 200, 1, 1_000_000),
            max_fails=_int(env, "UPSTREAM_MAX_FAILS", 3, 0, 1000),
            fail_timeout=_duration(env, "UPSTREAM_FAIL_TIMEOUT", "5s"),
            max_conns=_int(env, "UPSTREAM_MAX_CONNS", 32, 0, 1_000_000),
            audit_read_timeout=_duration(env, "AUDIT_READ_TIMEOUT", "300s"),
            worker_processes=workers,
        )
        return dataclasses.replace(config, **overrides)

    @property
    def address_rate(self) -> str:
        if self.limit_address_rate:
            return self.limit_address_rate
        match = RATE_RE.match(self.limit_read_rate)
        if match is None:
            raise RenderError(
                f"limit_read_rate must look like 200r/s, got {self.limit_read_rate!r}"
            )
        return f"{2 * int(match.group(1))}r/{match.group(2) or 's'}"

    @property
    def address_burst(self) -> int:
        if self.limit_address_burst is not None:
            return self.limit_address_burst
        return 2 * self.limit_read_burst

    @classmethod
    def compose(cls) -> NginxConfig:
        """The compose stack's config: defaults only, so the committed copy is reproducible.

        Listens on every address inside the container (only nginx publishes
        ports), proxies to the ``app`` service, logs to the container's
        stdout/stderr and keeps its scratch files where the nginx image has them.
        """
        return dataclasses.replace(
            cls.from_env({}),
            upstreams=(COMPOSE_UPSTREAM,),
            listen_host="",
            var_dir="/var/cache/nginx",
            access_log="/dev/stdout",
            error_log="stderr",
            mail_ui_upstream=COMPOSE_MAIL_UI,
            mail_ui_port=8025,
            resolver=COMPOSE_RESOLVER,
        )


# ---- problem+json bodies for the errors nginx itself answers --------------------


@dataclass(frozen=True)
class NginxProblem:
    location: str
    status: int
    code: str
    title: str
    detail: str
    retry_after: int | None = None
    # nginx answers 405 itself only for methods it never proxies (TRACE, ...);
    # RFC 9110 wants the methods that would work.
    allow: str | None = None


PROBLEMS: tuple[NginxProblem, ...] = (
    NginxProblem(
        "@bad_request", 400, "bad_request", "Bad request", "The HTTP request could not be parsed."
    ),
    NginxProblem(
        "@not_found", 404, "not_found", "No such resource", "This port does not serve that path."
    ),
    NginxProblem(
        "@request_timeout",
        408,
        "request_timeout",
        "Request timeout",
        "The request was not received in time.",
    ),
    NginxProblem(
        "@payload_too_large",
        413,
        "payload_too_large",
        "The body is too large",
        "Request bodies are limited to 64 KiB.",
    ),
    NginxProblem(
        "@method_not_allowed",
        405,
        "method_not_allowed",
        "Method not allowed",
        "The proxy does not accept this method.",
        allow="GET, HEAD, POST, PATCH",
    ),
    NginxProblem(
        "@uri_too_long", 414, "uri_too_long", "URI too long", "The request line is too long."
    ),
    NginxProblem(
        "@rate_limited",
        429,
        "rate_limited",
        "Too many requests",
        "The request rate or connection limit for this client was exceeded; "
        "retry after the number of seconds in Retry-After.",
        retry_after=1,
    ),
    NginxProblem(
        "@headers_too_large",
        431,
        "headers_too_large",
        "Request headers too large",
        "The request headers are too large.",
    ),
    NginxProblem(
        "@internal_error",
        500,
        "internal_error",
        "Internal error",
        "The proxy failed to handle the request.",
    ),
    # nginx says 502 when no instance could be reached at all (every one is
    # down or marked failed); for the client that is "temporarily unavailable,
    # retry", so it becomes a 503 with Retry-After.
    NginxProblem(
        "@upstream_unavailable",
        503,
        "upstream_unavailable",
        "The service is unavailable; retry later",
        "No application instance could take the request.",
        retry_after=1,
    ),
    NginxProblem(
        "@upstream_timeout",
        504,
        "upstream_timeout",
        "Upstream timeout",
        "The application did not answer in time.",
    ),
)

# status nginx produced -> named location (494 is nginx's "header too large").
ERROR_PAGES: tuple[tuple[str, str], ...] = (
    ("400", "@bad_request"),
    ("404", "@not_found"),
    ("408", "@request_timeout"),
    ("405", "@method_not_allowed"),
    ("413", "@payload_too_large"),
    ("414", "@uri_too_long"),
    ("429", "@rate_limited"),
    ("431 494", "@headers_too_large"),
    ("500", "@internal_error"),
    ("502 503", "=503 @upstream_unavailable"),
    ("504", "@upstream_timeout"),
)


def _problem_location(problem: NginxProblem) -> str:
    body = {
        "type": PROBLEM_TYPE_BASE + problem.code,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
        "request_id": "__REQ_ID__",
    }
    # $req_id is checked against a strict pattern or generated by nginx, so it
    # cannot break out of the JSON string.
    text = json.dumps(body, separators=(",", ":")).replace("__REQ_ID__", "$req_id")
    if "'" in text or "\\" in text:
        raise RenderError(f"problem body for {problem.code} cannot be quoted for nginx")
    lines = [
        f"        location {problem.location} {{",
        "            internal;",
        "            default_type application/problem+json;",
        "            add_header X-Request-ID $req_id always;",
        "            add_header Cache-Control no-store always;",
    ]
    if problem.retry_after is not None:
        lines.append(f"            add_header Retry-After {problem.retry_after} always;")
    if problem.allow is not None:
        lines.append(f'            add_header Allow "{problem.allow}" always;')
    lines += [f"            return {problem.status} '{text}';", "        }"]
    return "\n".join(lines)


# ---- server blocks ---------------------------------------------------------------


def _limits(config: NginxConfig) -> list[str]:
    return [
        f"limit_req zone=writes burst={config.limit_write_burst} nodelay;",
        f"limit_req zone=reads burst={config.limit_read_burst} nodelay;",
        f"limit_req zone=addresses burst={config.address_burst} nodelay;",
    ]


def _location(
    match: str,
    config: NginxConfig,
    *,
    limited: bool = True,
    websocket: bool = False,
    extra: Sequence[str] = (),
) -> str:
    body = _limits(config) if limited else []
    body += extra
    if websocket:
        # A WebSocket stays open for as long as the client listens.
        body += ["proxy_read_timeout 1h;", "proxy_send_timeout 1h;"]
    # WebSockets stay open for hours: they go through their own upstream, not
    # counted against the connection cap of ordinary requests.
    body.append(f"proxy_pass http://{'app_ws' if websocket else 'app'};")
    inner = "\n".join(f"            {line}" for line in body)
    return f"        location {match} {{\n{inner}\n        }}"


def _audit_location(config: NginxConfig) -> str:
    """GET /admin/audit: as long as a whole recount takes, and never twice.

    The audit sends nothing until it has read every row, so the read timeout
    bounds the whole audit. Retrying it on another instance (after a time-out
    or an error mid-answer) would only start a second full recount. Limits,
    headers and request id are the same as every other location's (the app
    checks the admin token).
    """
    return _location(
        "= /admin/audit",
        config,
        extra=[
            f"proxy_read_timeout {config.audit_read_timeout};",
            "proxy_next_upstream off;",
        ],
    )


def _server(name: str, port: int, config: NginxConfig, locations: list[str]) -> str:
    listen = f"{config.listen_host}:{port}" if config.listen_host else str(port)
    error_pages = "\n".join(
        f"        error_page {codes} {target};" for codes, target in ERROR_PAGES
    )
    probes = [
        # Probes are never rate limited: an overloaded stack must still say so.
        _location("= /healthz", config, limited=False),
        _location("= /readyz", config, limited=False),
    ]
    problems = "\n".join(_problem_location(p) for p in PROBLEMS)
    parts = [
        f"    # {name}",
        "    server {",
        f"        listen {listen} default_server;",
        "        server_name _;",
        f"        limit_conn per_address {config.limit_conn};",
        "        add_header X-Request-ID $req_id always;",
        error_pages,
        "",
        *probes,
        *locations,
        "",
        problems,
        "    }",
    ]
    return "\n".join(parts)


def _servers(config: NginxConfig) -> str:
    servers = []
    if config.http_port:
        servers.append(
            _server(
                "HTTP_PORT: the whole API",
                config.http_port,
                config,
                [
                    _location("= /orders/events", config, websocket=True),
                    _audit_location(config),
                    _location("/", config),
                ],
            )
        )
    not_found = "        location / {\n            return 404;\n        }"
    if config.seed_phones_port:
        servers.append(
            _server(
                "SEED_PHONES_PORT: the seed's phones service (/phones, /phones/...)",
                config.seed_phones_port,
                config,
                [
                    _location("= /phones", config),
                    _location("/phones/", config),
                    not_found,
                ],
            )
        )
    if config.seed_orders_port:
        servers.append(
            _server(
                "SEED_ORDERS_PORT: the seed's orders service (/orders..., /phones/check/{id})",
                config.seed_orders_port,
                config,
                [
                    _location("= /orders", config),
                    _location("= /orders/events", config, websocket=True),
                    _location("/orders/", config),
                    _location("/phones/check/", config),
                    not_found,
                ],
            )
        )
    if config.mail_ui_upstream and config.mail_ui_port:
        servers.append(_mail_ui_server(config))
    ports = [
        p
        for p in (
            config.http_port,
            config.seed_phones_port,
            config.seed_orders_port,
            config.mail_ui_port if config.mail_ui_upstream else 0,
        )
        if p
    ]
    if len(set(ports)) != len(ports):
        raise RenderError(f"HTTP_PORT, SEED_PHONES_PORT and SEED_ORDERS_PORT must differ: {ports}")
    if not servers:
        raise RenderError("every listener is off: set HTTP_PORT or a SEED_*_PORT")
    return "\n\n".join(servers)


def _mail_ui_server(config: NginxConfig) -> str:
    """Mailpit's web UI (the compose stack's dev mail sink), WebSocket included."""
    listen = (
        f"{config.listen_host}:{config.mail_ui_port}"
        if config.listen_host
        else str(config.mail_ui_port)
    )
    return "\n".join(
        [
            "    # Mailpit's web UI: the dev mail sink of the compose stack",
            "    server {",
            f"        listen {listen} default_server;",
            "        server_name _;",
            f"        limit_conn per_address {config.limit_conn};",
            "        location / {",
            "            proxy_read_timeout 1h;",
            f"            proxy_pass http://{config.mail_ui_upstream};",
            "        }",
            "    }",
        ]
    )


def _upstream_servers(config: NginxConfig, *, zone: str, capped: bool) -> str:
    if not config.upstreams:
        raise RenderError("no upstream instance to proxy to")
    cap = f" max_conns={config.max_conns}" if capped and config.max_conns else ""
    # `resolve` keeps the addresses in shared memory, which needs a zone.
    resolve = " resolve" if config.resolver else ""
    lines = [f"        zone {zone} 64k;"] if config.resolver else []
    lines += [
        f"        server {address}{resolve} max_fails={config.max_fails} fail_timeout={config.fail_timeout}{cap};"
        for address in config.upstreams
    ]
    return "\n".join(lines)


def _resolver(config: NginxConfig) -> str:
    if not config.resolver:
        return (
            "    # Fixed addresses: no resolver (nginx 1.22 has no `resolve` on upstream servers)."
        )
    return (
        "    # Docker's DNS, asked again every 10 s for the replicas of `server ... resolve`.\n"
        f"    resolver {config.resolver} valid=10s ipv6=off;\n"
        "    resolver_timeout 5s;"
    )


def _seed_service_ports(config: NginxConfig) -> str:
    """The $server_port -> seed service lines of the $seed_service map."""
    ports = [(config.seed_phones_port, "phones"), (config.seed_orders_port, "orders")]
    return "\n".join(f"        {port} {service};" for port, service in ports if port)


def render(config: NginxConfig) -> str:
    values = {
        "WORKER_PROCESSES": config.worker_processes,
        "VAR_DIR": config.var_dir.rstrip("/"),
        "ERROR_LOG": config.error_log,
        "ACCESS_LOG": config.access_log,
        "LIMIT_WRITE_RATE": config.limit_write_rate,
        "LIMIT_READ_RATE": config.limit_read_rate,
        "LIMIT_ADDRESS_RATE": config.address_rate,
        "RESOLVER": _resolver(config),
        "UPSTREAM_SERVERS": _upstream_servers(config, zone="app", capped=True),
        "WS_UPSTREAM_SERVERS": _upstream_servers(config, zone="app_ws", capped=False),
        "SERVERS": _servers(config),
        "SEED_SERVICE_PORTS": _seed_service_ports(config),
        **config.extra,
    }
    text = TEMPLATE.read_text()

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise RenderError(f"the template needs {{{{{name}}}}}, which nothing provides")
        return values[name]

    return re.sub(r"\{\{([A-Z_]+)\}\}", fill, text)


def write(config: NginxConfig, out: Path) -> None:
    """Write the rendered config and create the folders it names (local runs)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in (config.var_dir, config.access_log):
        if path.startswith("/dev/") or path == "stderr":
            continue
        target = Path(path) if path == config.var_dir else Path(path).parent
        if not target.is_absolute():
            target = ROOT / target
        target.mkdir(parents=True, exist_ok=True)
    out.write_text(render(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write nginx.conf (default: stdout)")
    parser.add_argument(
        "--compose",
        action="store_true",
        help="render the docker-compose copy (defaults only, upstream app:8000)",
    )
    parser.add_argument("--var-dir", help="pid and temp files (default: var/nginx of the repo)")
    parser.add_argument(
        "--access-log", help="JSON access log path (default: var/log/nginx-access.log)"
    )
    args = parser.parse_args(argv)

    try:
        if args.compose:
            config = NginxConfig.compose()
        else:
            config = NginxConfig.from_env(
                var_dir=str(Path(args.var_dir or ROOT / "var" / "nginx").resolve()),
                access_log=str(
                    Path(args.access_log or ROOT / "var" / "log" / "nginx-access.log").resolve()
                ),
            )
        if args.out is None:
            sys.stdout.write(render(config))
        elif args.compose:
            args.out.write_text(render(config))
        else:
            write(config, args.out)
    except RenderError as error:
        print(f"nginx/render.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
