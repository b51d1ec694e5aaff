"""nginx/render.py renders configs that the real nginx accepts (`nginx -t`), with
the listeners, limits and error pages issue 3 asks for."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from loadtests.support.servers import free_port
from loadtests.support.stack import NginxServer
from nginx.render import PROBLEMS, NginxConfig, RenderError, render, write
from tests.helpers import nginx_in_front_of

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_test(config: NginxConfig, directory: Path) -> subprocess.CompletedProcess:
    """Write config under directory and run `nginx -t` on it."""
    local = dataclasses.replace(
        config,
        var_dir=str(directory / "var"),
        access_log=str(directory / "access.log"),
        error_log="stderr",
    )
    conf = directory / "nginx.conf"
    write(local, conf)
    return subprocess.run(
        [NGINX, "-t", "-p", f"{directory}/", "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def listens(text: str) -> list[str]:
    return re.findall(r"^\s*listen\s+(\S+?)\s", text, flags=re.MULTILINE)


def test_defaults_pass_nginx_t(tmp_path: Path) -> None:
    config = NginxConfig.from_env({})
    result = nginx_test(config, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    text = render(config)
    assert listens(text) == ["127.0.0.1:8080", "127.0.0.1:5555", "127.0.0.1:7777"]
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\}", text, flags=re.DOTALL))
    # Ordinary requests: a connection cap per instance, so overload is answered
    # at once by nginx instead of overflowing the instances' accept queues.
    assert "server 127.0.0.1:8001 max_fails=3 fail_timeout=5s max_conns=32;" in upstreams["app"]
    assert "server 127.0.0.1:8002 max_fails=3 fail_timeout=5s max_conns=32;" in upstreams["app"]
    # WebSockets stay open for hours, and probes must answer whatever the load:
    # their own upstream, uncapped.
    assert "server 127.0.0.1:8001 max_fails=3 fail_timeout=5s;" in upstreams["app_uncapped"]
    for path in ("/orders/events", "/healthz", "/readyz"):
        block = re.search(rf"location = {path} \{{(.*?)\}}", text, flags=re.DOTALL)
        assert block and "proxy_pass http://app_uncapped;" in block.group(1), path
    # One count per instance over every nginx worker, not one per worker.
    assert "zone app_upstream 64k;" in upstreams["app"]
    # The app measures how long a request queued in front of it from here.
    assert 'proxy_set_header X-Request-Start "t=${msec}";' in text
    uncapped = render(NginxConfig.from_env({"UPSTREAM_MAX_CONNS": "0"}))
    assert not re.search(r"^\s*server .*max_conns", uncapped, flags=re.MULTILINE)


def test_seed_ports_off_pass_nginx_t(tmp_path: Path) -> None:
    config = NginxConfig.from_env({"SEED_PHONES_PORT": "0", "SEED_ORDERS_PORT": "0"})
    result = nginx_test(config, tmp_path)
    assert result.returncode == 0, result.stderr
    assert listens(render(config)) == ["127.0.0.1:8080"]


def test_only_a_seed_port(tmp_path: Path) -> None:
    config = NginxConfig.from_env({"HTTP_PORT": "0", "SEED_ORDERS_PORT": "0"})
    result = nginx_test(config, tmp_path)
    assert result.returncode == 0, result.stderr
    assert listens(render(config)) == ["127.0.0.1:5555"]


def test_environment_sets_ports_instances_and_limits() -> None:
    text = render(
        NginxConfig.from_env(
            {
                "HTTP_PORT": "9080",
                "WEB_INSTANCES": "3",
                "APP_BASE_PORT": "9001",
                "LIMIT_WRITE_RATE": "5r/s",
                "LIMIT_WRITE_BURST": "7",
                "LIMIT_READ_RATE": "50",
                "LIMIT_READ_BURST": "60",
                "LIMIT_CONN": "11",
            }
        )
    )
    assert "listen 127.0.0.1:9080 default_server;" in text
    for port in (9001, 9002, 9003):
        assert f"server 127.0.0.1:{port} " in text
    assert "zone=writes:10m rate=5r/s;" in text
    assert "zone=reads:10m rate=50r/s;" in text
    assert "limit_req zone=writes burst=7 nodelay;" in text
    assert "limit_req zone=reads burst=60 nodelay;" in text
    assert "limit_conn per_address 11;" in text
    # The per-address limit follows the read limit (twice it) unless set itself.
    assert "zone=addresses:10m rate=100r/s;" in text
    assert "limit_req zone=addresses burst=120 nodelay;" in text
    explicit = render(
        NginxConfig.from_env({"LIMIT_ADDRESS_RATE": "30r/m", "LIMIT_ADDRESS_BURST": "9"})
    )
    assert "zone=addresses:10m rate=30r/m;" in explicit
    assert "limit_req zone=addresses burst=9 nodelay;" in explicit


@pytest.mark.parametrize(
    "env",
    [
        {"LIMIT_WRITE_RATE": "fast"},
        {"LIMIT_READ_BURST": "-1"},
        {"HTTP_PORT": "70000"},
        {"HTTP_PORT": "5555"},  # collides with the seed phones port
        {"HTTP_PORT": "0", "SEED_PHONES_PORT": "0", "SEED_ORDERS_PORT": "0"},
        {"UPSTREAM_FAIL_TIMEOUT": "5s; evil"},
        {"LIMIT_ADDRESS_RATE": "lots"},
        {"LIMIT_ADDRESS_BURST": "-3"},
        {"AUDIT_READ_TIMEOUT": "forever"},
        {"AUDIT_READ_TIMEOUT": "300s; proxy_next_upstream timeout"},
        {"NGINX_ACCESS_LOG_BUFFER": "64k flush=1h"},
        {"NGINX_ACCESS_LOG_BUFFER": "0"},
        {"NGINX_PROXY_ERROR_LOG_LEVEL": "loud"},
        {"UPSTREAM_FILL_FIRST": "yes"},
    ],
)
def test_bad_environment_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(RenderError):
        render(NginxConfig.from_env(env))


def test_overflow_protection_and_retries() -> None:
    text = render(NginxConfig.from_env({}))
    assert "limit_req_status 429;" in text
    assert "limit_conn_status 429;" in text
    # Keyed by bearer token when present, else by address; writes apart from reads.
    assert re.search(r"map \$http_authorization \$limit_client \{", text)
    assert "limit_req_zone $limit_write_key zone=writes" in text
    assert "limit_req_zone $limit_read_key zone=reads" in text
    # The app's 503 is load shedding, not a dead instance: never a failure to count.
    assert "proxy_next_upstream error timeout http_502;" in text
    directives = re.sub(r"#[^\n]*", "", text)
    assert "non_idempotent" not in directives  # a POST is never retried by nginx
    assert "client_max_body_size 64k;" in text
    assert "keepalive 64;" in text
    assert "proxy_http_version 1.1;" in text
    assert "proxy_set_header Connection $connection_upgrade;" in text
    assert (
        'map $http_upgrade $connection_upgrade {\n        default upgrade;\n        ""      "";'
        in (text)
    )
    assert "proxy_set_header X-Request-ID $req_id;" in text
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text


def test_only_token_shaped_headers_get_a_bucket_of_their_own() -> None:
    """Issue 13 item 1: a made-up string after Bearer used to buy a new bucket."""
    text = render(NginxConfig.from_env({}))
    block = re.search(r"map \$http_authorization \$limit_client \{(.*?)\}\n", text, re.DOTALL)
    assert block is not None
    (pattern,) = re.findall(r'"~\*(.+)"', block.group(1))
    # nginx's PCRE, case-insensitive (~*); Python spells a named group (?P<...>).
    shaped = re.compile(pattern.replace("(?<", "(?P<"), re.IGNORECASE)
    customer = "Bearer " + secrets.token_urlsafe(32)
    assert shaped.match(customer) and shaped.match("bearer stack-admin-token-0123456789abcdef")
    assert shaped.match("Bearer " + "A" * 512 + "==")
    for made_up in ("Bearer x1", "Bearer " + "a" * 15, "Bearer a b c d e f g h i j k", "Basic xyz"):
        assert not shaped.match(made_up), made_up
    # Every limited location also counts against the client's address, whatever its token.
    limited = text.count("limit_req zone=reads ")
    assert limited > 0
    assert text.count("limit_req zone=addresses burst=800 nodelay;") == limited
    assert "limit_req_zone $binary_remote_addr zone=addresses:10m rate=400r/s;" in text


def test_access_log_buffering_and_proxy_error_level_pass_nginx_t(tmp_path: Path) -> None:
    """Per refused request at 10x capacity, nginx's own log writes were a tenth of
    its CPU: access lines are written in batches, and "no live upstreams" (one per
    refusal) is below the proxied locations' default level."""
    default = render(NginxConfig.from_env({}))
    assert re.search(r"access_log \S+ json buffer=64k flush=1s;", default)
    (rest,) = [
        block for block in _location_block(default, "/") if "proxy_pass http://app;" in block
    ]
    assert "error_log stderr crit;" in rest
    for probe in ("= /healthz", "= /readyz", "= /orders/events"):
        assert not [line for line in _location_block(default, probe)[0] if "error_log" in line]
    env = {"NGINX_ACCESS_LOG_BUFFER": "off", "NGINX_PROXY_ERROR_LOG_LEVEL": "error"}
    config = NginxConfig.from_env(env)
    text = render(config)
    assert re.search(r"access_log \S+ json;", text)
    assert "error_log stderr error;" in text and "error_log stderr crit;" not in text
    for each in (NginxConfig.from_env({"NGINX_ACCESS_LOG_BUFFER": "1m"}), config):
        result = nginx_test(each, tmp_path)
        assert result.returncode == 0, result.stderr


def _upstream(text: str, name: str) -> list[str]:
    block = re.search(rf"upstream {name} \{{(.*?)\}}", text, re.DOTALL)
    assert block is not None, name
    return [
        line.strip() for line in block.group(1).splitlines() if line.strip().startswith("server ")
    ]


def test_fill_first_sends_only_the_overflow_to_the_other_instances(tmp_path: Path) -> None:
    env = {"WEB_INSTANCES": "3", "APP_BASE_PORT": "8001"}

    def balancer(text: str, name: str) -> list[str]:
        block = re.search(rf"upstream {name} \{{(.*?)\}}", text, re.DOTALL)
        assert block is not None, name
        return [
            line.strip() for line in block.group(1).splitlines() if line.strip().startswith("hash ")
        ]

    for off in (
        {"UPSTREAM_FILL_FIRST": "0"},
        {"UPSTREAM_FILL_FIRST": "1", "UPSTREAM_MAX_CONNS": "0"},
    ):
        # Round robin when asked, and without a cap, where nothing would overflow.
        assert balancer(render(NginxConfig.from_env({**env, **off})), "app") == [], off
    config = NginxConfig.from_env({**env, "UPSTREAM_FILL_FIRST": "1"})
    text = render(config)
    # One key for every request: one instance until its cap, then the others.
    assert balancer(text, "app") == ['hash "fill-first";']
    servers = _upstream(text, "app")
    assert len(servers) == 3 and all("max_conns=32" in line for line in servers)
    # Probes and WebSockets keep round robin: every instance answers them.
    assert balancer(text, "app_uncapped") == []
    result = nginx_test(config, tmp_path)
    assert result.returncode == 0, result.stderr


async def test_fill_first_serves_from_the_first_instance_until_its_cap(tmp_path: Path) -> None:
    """Two instances behind a real nginx, each capped at one request in progress
    (UPSTREAM_MAX_CONNS=1). Round robin spreads one-at-a-time requests over both;
    with UPSTREAM_FILL_FIRST=1 they all go to one, the other takes the request the
    first has no room for, and past both caps nginx refuses."""
    release = asyncio.Event()
    served: list[int] = []
    holding = [asyncio.Event(), asyncio.Event()]

    def instance(index: int) -> web.Application:
        async def order(request: web.Request) -> web.Response:
            served.append(index)
            if request.headers.get("X-Hold") == "1":
                holding[index].set()
                await release.wait()
            return web.json_response({"ok": True}, status=201)

        app = web.Application()
        app.router.add_post("/orders", order)
        return app

    runners, upstreams = [], []
    for index in range(2):
        runner = web.AppRunner(instance(index))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        upstreams.append(f"127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as session:
            for fill_first in ("0", "1"):
                directory = tmp_path / f"fill-{fill_first}"
                env = {"UPSTREAM_MAX_CONNS": "1", "UPSTREAM_FILL_FIRST": fill_first}
                config = nginx_in_front_of(tuple(upstreams), directory, env)
                nginx = NginxServer(directory=directory, config=config)
                await asyncio.to_thread(nginx.start)
                base = f"http://127.0.0.1:{config.http_port}"
                try:
                    served.clear()
                    for _ in range(6):
                        async with session.post(f"{base}/orders", json={}) as answer:
                            assert answer.status == 201
                    if fill_first == "0":
                        assert sorted(set(served)) == [0, 1], served
                        continue
                    # One instance takes them all: the one the constant key hashes to.
                    (filled,) = set(served)
                    other = 1 - filled
                    assert served == [filled] * 6
                    release.clear()
                    first = asyncio.create_task(
                        session.post(f"{base}/orders", json={}, headers={"X-Hold": "1"})
                    )
                    await asyncio.wait_for(holding[filled].wait(), 30)
                    second = asyncio.create_task(
                        session.post(f"{base}/orders", json={}, headers={"X-Hold": "1"})
                    )
                    await asyncio.wait_for(holding[other].wait(), 30)  # the overflow
                    async with session.post(f"{base}/orders", json={}) as refused:
                        assert refused.status == 503  # both caps taken
                    release.set()
                    for held in (first, second):
                        async with await held as answer:
                            assert answer.status == 201
                    assert served == [filled] * 7 + [other]
                finally:
                    release.set()
                    await asyncio.to_thread(nginx.stop)
    finally:
        for runner in runners:
            await runner.cleanup()


def test_access_log_is_json_and_never_has_the_authorization_header() -> None:
    text = render(NginxConfig.from_env({}))
    log_format = text[text.index("log_format json") : text.index("access_log ")]
    assert "escape=json" in log_format
    assert "authorization" not in log_format.lower()
    sample = re.sub(r"\$[a-z_]+", "0", "".join(re.findall(r"'([^']*)'", log_format)))
    assert json.loads(sample)["request_id"] == "0"


def test_every_nginx_error_is_problem_json() -> None:
    text = render(NginxConfig.from_env({}))
    assert "error_page 429 @rate_limited;" in text
    assert "error_page 413 @payload_too_large;" in text
    assert "error_page 502 503 =503 @upstream_unavailable;" in text
    assert "error_page 504 @upstream_timeout;" in text
    bodies = re.findall(r"return (\d{3}) '(\{.*\})';", text)
    assert {int(status) for status, _ in bodies} >= {400, 404, 413, 414, 429, 500, 503, 504}
    for status, body in bodies:
        problem = json.loads(body.replace("$req_id", "r1"))
        assert problem["status"] == int(status)
        assert set(problem) >= {"type", "title", "status", "detail", "code"}
    assert text.count("default_type application/problem+json;") == len(bodies)
    assert {p.code for p in PROBLEMS if p.retry_after} == {"rate_limited", "upstream_unavailable"}


def _location_block(text: str, match: str) -> list[str]:
    """The directives of every ``location <match>`` block, one list per block."""
    blocks = re.findall(
        rf"^\s*location {re.escape(match)} \{{\n(.*?)^\s*\}}", text, re.DOTALL | re.MULTILINE
    )
    return [[line.strip() for line in block.strip().splitlines()] for block in blocks]


def test_the_audit_has_a_location_that_waits_for_it_and_never_retries_it(tmp_path: Path) -> None:
    """GET /admin/audit answers only after a whole recount (68.5 s measured at 1M
    orders on a loaded box): 30 s cut it off, and nginx then started a second
    audit on the other instance."""
    text = render(NginxConfig.from_env({}))
    (audit,) = _location_block(text, "= /admin/audit")
    # The whole API's `location /` (the seed ports' ones answer 404 themselves).
    (rest,) = [block for block in _location_block(text, "/") if "proxy_pass http://app;" in block]
    assert "proxy_read_timeout 300s;" in audit
    assert "proxy_next_upstream off;" in audit
    assert audit[-1] == "proxy_pass http://app;"
    # The same rate limits as everything else, and nothing that would drop the
    # http-level proxy_set_header lines (X-Request-ID, X-Request-Start...) or
    # the server's X-Request-ID answer header.
    assert [line for line in audit if line.startswith("limit_req ")] == [
        line for line in rest if line.startswith("limit_req ")
    ]
    assert len([line for line in audit if line.startswith("limit_req ")]) == 3
    assert not [line for line in audit if line.startswith(("proxy_set_header", "add_header"))]
    # Everything else keeps the 30 s and the failover.
    assert "proxy_read_timeout 30s;" in text
    assert "proxy_next_upstream error timeout http_502;" in text
    # Only the whole API's port serves the admin area.
    seed_only = render(NginxConfig.from_env({"HTTP_PORT": "0"}))
    assert "/admin/audit" not in seed_only

    config = NginxConfig.from_env({"AUDIT_READ_TIMEOUT": "15m"})
    assert "proxy_read_timeout 15m;" in _location_block(render(config), "= /admin/audit")[0]
    result = nginx_test(config, tmp_path)
    assert result.returncode == 0, result.stderr


async def test_a_slow_audit_is_asked_of_one_instance_only(tmp_path: Path) -> None:
    """A real nginx before two instances whose audit never answers: past
    AUDIT_READ_TIMEOUT the client gets 504 problem+json with its request id,
    and the other instance was never asked (no second audit)."""
    asked: list[tuple[int, str | None]] = []
    release = asyncio.Event()
    runners = []
    ports = [free_port(), free_port()]
    for port in ports:

        async def audit(request: web.Request, port: int = port) -> web.Response:
            asked.append((port, request.headers.get("X-Request-ID")))
            await release.wait()
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/admin/audit", audit)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    config = nginx_in_front_of(
        tuple(f"127.0.0.1:{port}" for port in ports), tmp_path, {"AUDIT_READ_TIMEOUT": "1s"}
    )
    nginx = NginxServer(directory=tmp_path, config=config)
    await asyncio.to_thread(nginx.start)
    try:
        url = f"http://127.0.0.1:{config.http_port}/admin/audit"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.get(url, headers={"X-Request-ID": "audit-once-1"}) as response,
        ):
            assert response.status == 504
            assert response.headers["X-Request-ID"] == "audit-once-1"
            assert (await response.json(content_type=None))["code"] == "upstream_timeout"
        # nginx answered only after giving up; a retry would have come before it.
        assert len(asked) == 1, asked
        assert asked[0][1] == "audit-once-1"

        # An audit that answers in time passes through unchanged.
        release.set()
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            assert await response.json() == {"ok": True}
        assert len(asked) == 2
    finally:
        release.set()
        await asyncio.to_thread(nginx.stop)
        for runner in runners:
            await runner.cleanup()


@pytest.mark.parametrize("level", ["crit", "error"])
async def test_a_full_stack_is_refused_by_nginx_and_its_probes_still_pass(
    tmp_path: Path, level: str
) -> None:
    """A real nginx before one instance whose cap (UPSTREAM_MAX_CONNS=1) is taken
    by a request that does not finish: the next request is refused at once with
    503 problem+json and Retry-After, probes still reach the instance, and the
    refusal writes an error line only when asked to (NGINX_PROXY_ERROR_LOG_LEVEL)."""
    release, holding = asyncio.Event(), asyncio.Event()
    arrived: list[str] = []

    async def order(request: web.Request) -> web.Response:
        arrived.append(request.headers.get("X-Request-ID", ""))
        holding.set()
        await release.wait()
        return web.json_response({"ok": True}, status=201)

    async def probe(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/orders", order)
    app.router.add_get("/healthz", probe)
    app.router.add_get("/readyz", probe)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    env = {"UPSTREAM_MAX_CONNS": "1", "NGINX_PROXY_ERROR_LOG_LEVEL": level}
    config = nginx_in_front_of((f"127.0.0.1:{port}",), tmp_path, env)
    nginx = NginxServer(directory=tmp_path, config=config)
    await asyncio.to_thread(nginx.start)
    base = f"http://127.0.0.1:{config.http_port}"
    try:
        async with aiohttp.ClientSession() as session:
            held = asyncio.create_task(
                session.post(f"{base}/orders", json={}, headers={"X-Request-ID": "holds-the-cap"})
            )
            await asyncio.wait_for(holding.wait(), 30)  # the instance holds the cap now
            async with session.post(f"{base}/orders", json={}) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
                body = await refused.json(content_type="application/problem+json")
                assert body["code"] == "upstream_unavailable"
            for path in ("/healthz", "/readyz"):
                async with session.get(f"{base}{path}") as answer:
                    assert answer.status == 200, path
            release.set()
            async with await held as served:
                assert served.status == 201
        assert arrived == ["holds-the-cap"]
    finally:
        release.set()
        await asyncio.to_thread(nginx.stop)
        await runner.cleanup()
    logged = nginx.error_log.read_text().count("no live upstreams")
    assert logged == (1 if level == "error" else 0), nginx.error_log.read_text()
