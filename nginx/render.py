"""Render nginx/nginx.conf.template (jinja2) into a complete nginx.conf.

    python -m nginx.render --out var/nginx/nginx.conf     # make run: from the environment
    python -m nginx.render --compose --out nginx/compose.conf   # the compose stack's copy

Environment (each default is its NginxConfig field's, mirrored in .env.example):
    HTTP_PORT                 the whole API; 0 turns it off
    SEED_PHONES_PORT          the seed's phones service: /phones, /phones/... ; 0 = off
    SEED_ORDERS_PORT          the seed's orders service: /orders..., /phones/check/{id}; 0 = off
    WEB_INSTANCES, APP_BASE_PORT   the upstream instances (defaults in app/ops/instances.py)
    LIMIT_WRITE_RATE, LIMIT_WRITE_BURST    POST/PATCH/PUT/DELETE, per token or address
    LIMIT_READ_RATE, LIMIT_READ_BURST      everything else
    LIMIT_ADDRESS_RATE, LIMIT_ADDRESS_BURST   per address, any token [twice the read ones]
    LIMIT_CONN                open connections per client address
    UPSTREAM_MAX_FAILS, UPSTREAM_FAIL_TIMEOUT   passive health checks
    UPSTREAM_MAX_CONNS        requests in progress at one instance (0 = no cap)
    UPSTREAM_FILL_FIRST       1: one instance takes all until its cap, the rest the
                              overflow; 0 (default): round robin
    NGINX_ACCESS_LOG_BUFFER   access lines gathered per write, flushed at least each second (off = a write per line)
    NGINX_PROXY_ERROR_LOG_LEVEL   the least severe error-log line of proxied requests
    AUDIT_READ_TIMEOUT        how long nginx waits for GET /admin/audit's answer
    NGINX_WORKER_PROCESSES

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from app.env import env_int
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
SIZE_RE = re.compile(r"^[1-9][0-9]{0,5}[km]?$")
LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")


class RenderError(ValueError):
    """The environment holds a value nginx cannot be configured with."""


# ---- parsing one environment variable (set and not blank) -----------------------

Parser = Callable[[str, str], object]


def _integer(low: int, high: int) -> Parser:
    def parse(name: str, raw: str) -> int:
        return env_int({name: raw}, name, low, low, high, error=RenderError)

    return parse


def _rate(name: str, raw: str) -> str:
    match = RATE_RE.match(raw)
    if match is None:
        raise RenderError(f"{name} must look like 20r/s, 600r/m or 20, got {raw!r}")
    return f"{match.group(1)}r/{match.group(2) or 's'}"


def _duration(name: str, raw: str) -> str:
    if DURATION_RE.match(raw) is None:
        raise RenderError(f"{name} must be an nginx duration like 5s or 500ms, got {raw!r}")
    return raw


def _buffer(name: str, raw: str) -> str:
    if raw != "off" and SIZE_RE.match(raw) is None:
        raise RenderError(f"{name} must be off or an nginx size like 64k, got {raw!r}")
    return raw


def _log_level(name: str, raw: str) -> str:
    if raw not in LOG_LEVELS:
        raise RenderError(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return raw


def _flag(name: str, raw: str) -> bool:
    if raw not in ("0", "1"):
        raise RenderError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _workers(name: str, raw: str) -> str:
    if raw != "auto" and not (raw.isascii() and raw.isdigit() and int(raw) > 0):
        raise RenderError(f"{name} must be auto or a count, got {raw!r}")
    return raw


_PORT = _integer(0, 65535)
_COUNT = _integer(0, 1_000_000)

# environment variable -> (NginxConfig field, parser). Unset or blank: the
# field's default.
ENVIRONMENT: Mapping[str, tuple[str, Parser]] = {
    "HTTP_PORT": ("http_port", _PORT),
    "SEED_PHONES_PORT": ("seed_phones_port", _PORT),
    "SEED_ORDERS_PORT": ("seed_orders_port", _PORT),
    "LIMIT_WRITE_RATE": ("limit_write_rate", _rate),
    "LIMIT_WRITE_BURST": ("limit_write_burst", _COUNT),
    "LIMIT_READ_RATE": ("limit_read_rate", _rate),
    "LIMIT_READ_BURST": ("limit_read_burst", _COUNT),
    "LIMIT_ADDRESS_RATE": ("limit_address_rate", _rate),
    "LIMIT_ADDRESS_BURST": ("limit_address_burst", _integer(0, 2_000_000)),
    "LIMIT_CONN": ("limit_conn", _integer(1, 1_000_000)),
    "UPSTREAM_MAX_FAILS": ("max_fails", _integer(0, 1000)),
    "UPSTREAM_FAIL_TIMEOUT": ("fail_timeout", _duration),
    "UPSTREAM_MAX_CONNS": ("max_conns", _COUNT),
    "UPSTREAM_FILL_FIRST": ("fill_first", _flag),
    "AUDIT_READ_TIMEOUT": ("audit_read_timeout", _duration),
    "NGINX_WORKER_PROCESSES": ("worker_processes", _workers),
    "NGINX_ACCESS_LOG_BUFFER": ("access_log_buffer", _buffer),
    "NGINX_PROXY_ERROR_LOG_LEVEL": ("proxy_error_log_level", _log_level),
}


def _local_upstreams(env: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(f"127.0.0.1:{port}" for port in instance_ports(env))


@dataclass(frozen=True)
class NginxConfig:
    """Everything the template needs, with the one set of defaults.

    ``from_env`` reads it (ENVIRONMENT names the variable of each field), tests
    build it directly.
    """

    upstreams: Sequence[str] = _local_upstreams({})
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
    # refusals p99 38 ms, goodput 96% (one run's A/B, 2026-11-30).
    max_conns: int = 32
    # Send the capped traffic to one instance until it has max_conns in progress,
    # and only the overflow to the others (nginx's `hash` on one constant key: a
    # server at max_conns or failed is skipped and another tried, then round robin
    # after 20 tries), instead of round robin. Below capacity the requests then stay
    # on one worker: two workers alternating on one core find their caches cold.
    # Measured with one stack core, 2 instances x 1 worker, open loop: app CPU per
    # order 0.69x at 600 orders/s, 0.76x at 1,200 (accepted p99 0.41x); goodput
    # 1.06x at 2,400 and 1.32x at ~3x capacity (docs/BENCH.md has the bench run).
    # A hash has no `backup` servers, which the first form used: with backups the
    # second instance takes nothing while the first is up, and a backup counts
    # failures of its own. Without a cap (max_conns 0) nothing overflows: round
    # robin then.
    # Off by default: in a whole make bench run with it on (2026-12-02 05:44) the
    # half-load p99 fell from 42 to 18.5 ms and 3x goodput rose 73% -> 77%, but
    # the 10x accepted p99 rose 112 -> 139 ms and refused p99 12 -> 22 ms; issue
    # 12's ratio targets then failed where round robin met them.
    fill_first: bool = False
    # GET /admin/audit answers only once it has recounted every row: 10 s at
    # 1M orders on a quiet box, 68.5 s on a loaded one under 2,000 orders/s
    # (measured in a review run). The 30 s of every other location would cut
    # it off and retry it on the other instance (a second audit); its own
    # location waits this long and never retries.
    audit_read_timeout: str = "300s"
    worker_processes: str = "auto"
    var_dir: str = "var/nginx"  # pid and temp files
    access_log: str = "var/log/nginx-access.log"
    # Access lines are gathered and written together, at least once a second
    # ("off": one write per line). Per line, the write cost nginx ~1 µs of
    # the ~18 µs it spends refusing a request at 10x capacity, where it refuses
    # 20,000 a second on the app's CPU (docs/BENCH.md's CPU breakdown).
    access_log_buffer: str = "64k"
    error_log: str = "stderr"
    # Proxied requests (not probes, not WebSockets) log from this level up.
    # At "error", nginx writes "no live upstreams" for every request it
    # refuses because each instance has UPSTREAM_MAX_CONNS in progress: one
    # line per refusal, 20,000 a second at 10x capacity, ~2 µs of nginx's CPU
    # each (measured; the app's CPU). Upstream failures stay in the access
    # log (status, upstream_status, upstream_addr); "error" brings back their
    # reasons, with that flood.
    proxy_error_log_level: str = "crit"
    # Compose only: nginx also fronts Mailpit's web UI, so that nginx stays the
    # one service publishing ports. "" / 0 = no such server.
    mail_ui_upstream: str = ""
    mail_ui_port: int = 0
    # Compose only: the DNS server that `server app:8000 resolve` asks again
    # and again, so that `--scale app=N` is followed without a reload (nginx
    # >= 1.27.3). "" (make run, Debian's nginx 1.22): the addresses are fixed
    # when nginx loads its config, as they are for 127.0.0.1 ports.
    resolver: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> NginxConfig:
        env = os.environ if env is None else env
        values: dict[str, object] = {"upstreams": _local_upstreams(env)}
        for name, (field_name, parse) in ENVIRONMENT.items():
            raw = env.get(name, "").strip()
            if raw:
                values[field_name] = parse(name, raw)
        return dataclasses.replace(cls(**values), **overrides)

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
        return cls(
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
    # What error_page names: a named location, or an internal URI for the errors nginx
    # meets while it reads the request line (400, 414), where no URI was parsed
    # yet: a redirect to a named location then fails ("empty URI in redirect to named
    # location") and nginx answered its own HTML 500.
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
        "/_problems/bad_request",
        400,
        "bad_request",
        "Bad request",
        "The HTTP request could not be parsed.",
    ),
    NginxProblem(
        "@not_found", 404, "not_found", "No such resource", "This port does not serve that path."
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
        "/_problems/uri_too_long",
        414,
        "uri_too_long",
        "URI too long",
        "The request line is too long.",
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

# status nginx produced -> its problem's location (494 is nginx's "header too large").
# No 408: past client_header_timeout or client_body_timeout nginx closes the connection
# and sends nothing (it terminates a 408 instead of answering it: measured with 1.22, the
# access log says 408 with 0 bytes), so an error_page for it was never served.
ERROR_PAGES: tuple[tuple[str, str], ...] = (
    ("400", "/_problems/bad_request"),
    ("404", "@not_found"),
    ("405", "@method_not_allowed"),
    ("413", "@payload_too_large"),
    ("414", "/_problems/uri_too_long"),
    ("429", "@rate_limited"),
    ("431 494", "@headers_too_large"),
    ("500", "@internal_error"),
    ("502 503", "=503 @upstream_unavailable"),
    ("504", "@upstream_timeout"),
)


def problem_body(problem: NginxProblem) -> str:
    """The JSON body of a problem nginx answers, quoted in the template with '...'."""
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
    return text


# ---- which port serves which locations --------------------------------------------


@dataclass(frozen=True)
class Location:
    """One proxied ``location`` block (the template's location_block)."""

    match: str
    limited: bool = True
    websocket: bool = False
    read_timeout: str = ""  # "" keeps the http block's proxy_read_timeout
    send_timeout: str = ""
    retried: bool = True  # proxy_next_upstream as in the http block
    not_found: bool = False  # answers 404 itself instead of proxying
    # Counted against UPSTREAM_MAX_CONNS (upstream `app`); probes and WebSockets
    # are not (upstream `app_uncapped`).
    capped: bool = True


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    locations: tuple[Location, ...]


# Probes are never rate limited nor capped: an overloaded stack must still say
# so, not have its probes refused with the overflow (the app never sheds them).
PROBES = (
    Location("= /healthz", limited=False, capped=False),
    Location("= /readyz", limited=False, capped=False),
)
NOT_FOUND = Location("/", not_found=True)


def _websocket(match: str) -> Location:
    # A WebSocket stays open for as long as the client listens.
    return Location(match, websocket=True, read_timeout="1h", send_timeout="1h", capped=False)


def _audit(config: NginxConfig) -> Location:
    """GET /admin/audit: as long as a whole recount takes, and never twice.

    The audit sends nothing until it has read every row, so the read timeout
    bounds the whole audit. Retrying it on another instance (after a time-out
    or an error mid-answer) would only start a second full recount. Limits,
    headers and request id are the same as every other location's (the app
    checks the admin token).
    """
    return Location("= /admin/audit", read_timeout=config.audit_read_timeout, retried=False)


def servers(config: NginxConfig) -> list[Server]:
    """The app's servers, one per port that is on, each after the probes."""
    table = [
        (
            "HTTP_PORT: the whole API",
            config.http_port,
            (_websocket("= /orders/events"), _audit(config), Location("/")),
        ),
        (
            "SEED_PHONES_PORT: the seed's phones service (/phones, /phones/...)",
            config.seed_phones_port,
            (Location("= /phones"), Location("/phones/"), NOT_FOUND),
        ),
        (
            "SEED_ORDERS_PORT: the seed's orders service (/orders..., /phones/check/{id})",
            config.seed_orders_port,
            (
                Location("= /orders"),
                _websocket("= /orders/events"),
                Location("/orders/"),
                Location("/phones/check/"),
                NOT_FOUND,
            ),
        ),
    ]
    ports = [port for _, port, _ in table if port]
    if config.mail_ui_upstream and config.mail_ui_port:
        ports.append(config.mail_ui_port)
    if len(set(ports)) != len(ports):
        raise RenderError(f"HTTP_PORT, SEED_PHONES_PORT and SEED_ORDERS_PORT must differ: {ports}")
    if not any(port for _, port, _ in table):
        raise RenderError("every listener is off: set HTTP_PORT or a SEED_*_PORT")
    return [Server(name, port, PROBES + locations) for name, port, locations in table if port]


_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,  # an nginx config, not HTML
)


def render(config: NginxConfig) -> str:
    if not config.upstreams:
        raise RenderError("no upstream instance to proxy to")

    def listen(port: int) -> str:
        return f"{config.listen_host}:{port}" if config.listen_host else str(port)

    ports = [(config.seed_phones_port, "phones"), (config.seed_orders_port, "orders")]
    return _TEMPLATES.get_template(TEMPLATE.name).render(
        config=config,
        var_dir=config.var_dir.rstrip("/"),
        seed_services=[(port, service) for port, service in ports if port],
        servers=servers(config),
        error_pages=ERROR_PAGES,
        problems=PROBLEMS,
        problem_body=problem_body,
        listen=listen,
    )


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
