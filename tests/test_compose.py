"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine here):
services, health checks, dependencies, published ports, and the nginx config
the compose stack mounts, which must be fresh and pass `nginx -t`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
import yaml
from redis import Redis
from redis.exceptions import AuthenticationError

from app.settings import Settings, SettingsError
from loadtests.support.servers import free_port, stop_process, wait_for_port
from mail.settings import MailSettings
from nginx.render import COMPOSE_CONF, NginxConfig, render

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def test_the_services(services: dict[str, dict]) -> None:
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"redis", "app", "nginx", "mail", "mailpit"}
    assert services["prometheus"]["profiles"] == ["metrics"]
    assert services["mail"]["command"] == ["python", "-m", "mail"]


def test_every_service_has_a_healthcheck(services: dict[str, dict]) -> None:
    for name, service in services.items():
        if service.get("restart") == "no":
            continue  # a one-shot job (the cluster profile's init): its exit status says
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
    app_check = " ".join(services["app"]["healthcheck"]["test"])
    assert "/readyz" in app_check


def test_dependencies_wait_for_health(services: dict[str, dict]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
        for dependency, rule in depends.items():
            assert dependency in services
            assert rule == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["app"]["depends_on"]) == {"redis"}
    assert "app" in services["nginx"]["depends_on"]
    assert "redis" in services["mail"]["depends_on"]


def test_only_nginx_publishes_ports_and_app_scales(services: dict[str, dict]) -> None:
    publishers = {
        name
        for name, service in services.items()
        if service.get("ports") and not service.get("profiles")
    }
    assert publishers == {"nginx"}
    # The metrics profile's Prometheus publishes its UI, on PUBLISH_ADDRESS only.
    assert services["prometheus"]["ports"] == [
        "${PUBLISH_ADDRESS:-127.0.0.1}:${PROMETHEUS_PORT:-9090}:9090"
    ]
    app = services["app"]
    assert "container_name" not in app
    assert app["expose"] == ["8000"]
    published = [port.rsplit(":", 1)[-1] for port in services["nginx"]["ports"]]
    assert {"8080", "5555", "7777"} <= set(published)


def _script(service: dict) -> str:
    """The shell script of a `sh -ec <script>` command."""
    command = service["command"]
    assert command[:2] == ["sh", "-ec"], command
    return command[2]


def test_redis_has_aof_and_requires_a_password_from_a_file(services: dict[str, dict]) -> None:
    redis = services["redis"]
    script = _script(redis)
    start = script.strip().splitlines()[-1]
    assert start.startswith("exec docker-entrypoint.sh redis-server /tmp/secret.conf ")
    assert "--appendonly yes" in start and "--requirepass" not in script
    assert "read -r password < /run/secrets/redis_password" in script
    assert 'printf \'requirepass "%s"\\n\' "$$password" > /tmp/secret.conf' in script
    assert redis["secrets"] == ["redis_password"]
    assert "ports" not in redis
    for name in ("app", "mail"):
        environment = services[name]["environment"]
        assert environment["REDIS_URL"] == "redis://redis:6379/0"  # no password in it
        assert environment["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert "redis_password" in services[name]["secrets"]


def test_no_secret_on_a_command_line_or_in_an_environment(compose: dict) -> None:
    """The Redis password and the admin token travel only as secret files."""
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        for variable, value in environment.items():
            assert variable not in {"ADMIN_TOKEN", "REDIS_PASSWORD", "REDISCLI_AUTH"}, name
            assert not re.search(r"\$\{(ADMIN_TOKEN|REDIS_PASSWORD)\b", str(value)), name
            assert "@" not in str(value) or variable != "REDIS_URL", name
        words = json.dumps([service.get("command"), service.get("healthcheck", {}).get("test")])
        assert not re.search(r"\$\{(ADMIN_TOKEN|REDIS_PASSWORD)\b", words), name
        assert not re.search(r"redis-cli[^|]* -a ", words), name
    assert compose["secrets"] == {
        "redis_password": {"file": "./secrets/redis_password"},
        "admin_token": {"file": "./secrets/admin_token"},
    }
    # `make secrets` writes them, and git never sees them.
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    makefile = (ROOT / "Makefile").read_text()
    assert "COMPOSE_SECRETS := secrets/redis_password secrets/admin_token" in makefile


def test_the_app_and_the_mail_worker_read_their_secret_files(tmp_path: Path) -> None:
    token, password = "t" * 20 + "-file", "p@ss/word:1"
    (tmp_path / "admin_token").write_text(token + "\n")
    (tmp_path / "redis_password").write_text(password + "\n")
    env = {
        "REDIS_URL": "redis://redis:6379/0",
        "REDIS_PASSWORD_FILE": str(tmp_path / "redis_password"),
        "ADMIN_TOKEN_FILE": str(tmp_path / "admin_token"),
    }
    settings = Settings.from_env(env)
    assert settings.admin_token == token
    parts = urlsplit(settings.redis_url)
    assert (unquote(parts.password), parts.hostname, parts.port) == (password, "redis", 6379)
    assert password not in repr(settings) and quote(password, safe="") not in repr(settings)
    assert MailSettings.from_env(env).redis_url == settings.redis_url
    assert quote(password, safe="") not in repr(MailSettings.from_env(env))
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env({**env, "ADMIN_TOKEN": token})
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.from_env({**env, "ADMIN_TOKEN_FILE": str(tmp_path / "missing")})
    # A REDIS_PASSWORD left in .env for compose changes nothing for make run.
    plain = Settings.from_env(
        {"REDIS_URL": "redis://127.0.0.1:6390/0", "REDIS_PASSWORD": "x", "ADMIN_TOKEN": token}
    )
    assert plain.redis_url == "redis://127.0.0.1:6390/0"


def test_mail_workers_scale(services: dict[str, dict]) -> None:
    mail = services["mail"]
    # Each replica names itself {hostname}-{pid}: a fixed name would make two
    # replicas one consumer and one health key.
    assert "MAIL_WORKER_NAME" not in mail["environment"]
    assert "container_name" not in mail and "ports" not in mail
    assert "hostname" not in mail


def test_nginx_follows_app_replicas_without_a_reload(services: dict[str, dict]) -> None:
    image = services["nginx"]["image"]
    match = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?-bookworm", image)
    assert match, image
    version = tuple(int(part or 0) for part in match.groups())
    assert version >= (1, 27, 3), "`resolve` on upstream servers needs nginx 1.27.3"
    text = COMPOSE_CONF.read_text()
    assert "resolver 127.0.0.11 valid=10s ipv6=off;" in text  # Docker's DNS
    servers = re.findall(r"^\s*server app:8000[^;]*;", text, flags=re.MULTILINE)
    assert len(servers) == 2 and all(" resolve " in server for server in servers)
    assert "zone app 64k;" in text and "zone app_uncapped 64k;" in text
    # make run's copy, for Debian's nginx 1.22, keeps its fixed list.
    local = "\n".join(
        line
        for line in render(NginxConfig.from_env({})).splitlines()
        if not line.lstrip().startswith("#")
    )
    assert " resolve" not in local and "resolver " not in local
    assert "server 127.0.0.1:8001 max_fails" in local


def test_app_runs_gunicorn_conf_and_stops_after_graceful_timeout(
    services: dict[str, dict],
) -> None:
    app = services["app"]
    assert app["command"] == ["gunicorn", "--config", "gunicorn.conf.py"]
    grace = int(app["stop_grace_period"].removesuffix("s"))
    graceful = int(re.search(r":-(\d+)", app["environment"]["WEB_GRACEFUL_TIMEOUT"]).group(1))
    assert graceful < grace
    assert app["environment"]["ADMIN_TOKEN_FILE"] == "/run/secrets/admin_token"
    assert "admin_token" in app["secrets"]


def test_dockerfile_runs_gunicorn_conf_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    cmd = re.findall(r"^CMD\s+(.+)$", text, flags=re.MULTILINE)
    assert len(cmd) == 1
    assert json.loads(cmd[0]) == ["gunicorn", "--config", "gunicorn.conf.py"]
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert "COPY gunicorn.conf.py" in text


def test_nginx_mounts_the_config_rendered_from_nginx_dir(services: dict[str, dict]) -> None:
    nginx = services["nginx"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in nginx["volumes"]}
    assert mounts == {"./nginx/compose.conf": "/etc/nginx/nginx.conf"}
    assert ROOT / "nginx" / "compose.conf" == COMPOSE_CONF
    fresh = render(NginxConfig.compose())
    assert COMPOSE_CONF.read_text() == fresh, (
        "nginx/compose.conf is stale: run `python -m nginx.render --compose --out nginx/compose.conf`"
    )
    # The config has `daemon off;`: the image's default `-g 'daemon off;'` would clash.
    assert "-g" not in nginx["command"]


def test_compose_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    """The committed file, with only the names Docker resolves and the image's
    paths swapped for local ones, since nginx -t resolves upstream hosts."""
    text = COMPOSE_CONF.read_text()
    swaps = {
        # Debian's nginx 1.22 knows neither `resolve` nor, so, Docker's resolver.
        "server app:8000 resolve ": "server 127.0.0.1:8000 ",
        "resolver 127.0.0.11 valid=10s ipv6=off;": "",
        "proxy_pass http://mailpit:8025;": "proxy_pass http://127.0.0.1:8025;",
        "/var/cache/nginx": str(tmp_path / "var"),
    }
    for old, new in swaps.items():
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "var").mkdir()  # /var/cache/nginx exists in the nginx image
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = subprocess.run(
        [NGINX, "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_metrics_profile_scrapes_every_app_replica_and_the_mail_worker(
    compose: dict, services: dict[str, dict]
) -> None:
    """Prometheus (profile `metrics`) reads app/admin/prometheus.yml, which must
    point at the ports the app and the mail worker really serve /metrics on,
    with the admin token from a compose secret (the app is not its loopback)."""
    prometheus = services["prometheus"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in prometheus["volumes"]}
    assert mounts["./app/admin/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert set(prometheus["depends_on"]) == {"app", "mail"}

    config = yaml.safe_load((ROOT / "app" / "admin" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"phoneshop-app", "phoneshop-mail"}

    app_job = jobs["phoneshop-app"]
    assert app_job["metrics_path"] == "/metrics"
    [discovery] = app_job["dns_sd_configs"]  # every replica, not one through nginx
    assert discovery["names"] == ["app"] and discovery["type"] == "A"
    assert str(discovery["port"]) in services["app"]["expose"]
    assert services["app"]["environment"]["WEB_BIND"].endswith(f":{discovery['port']}")
    token_file = app_job["authorization"]["credentials_file"]
    [secret] = prometheus["secrets"]
    assert token_file == f"/run/secrets/{secret['target']}"
    assert compose["secrets"][secret["source"]] == {"file": "./secrets/admin_token"}
    assert "ADMIN_TOKEN" not in json.dumps(config)  # the token is never in the file

    mail_job = jobs["phoneshop-mail"]
    [discovery] = mail_job["dns_sd_configs"]  # every mail replica
    assert discovery["names"] == ["mail"] and discovery["type"] == "A"
    port = str(discovery["port"])
    mail = services["mail"]
    assert mail["environment"]["MAIL_METRICS_PORT"] == port
    assert mail["environment"]["MAIL_METRICS_ADDRESS"] == "0.0.0.0"
    assert port in mail["expose"]


def test_the_redis_start_script_and_health_check_keep_the_password_off_command_lines(
    services: dict[str, dict], tmp_path: Path
) -> None:
    """The compose redis service's own shell lines, run here against a real
    redis-server: only the secret file's path and Docker's wrappers swapped."""
    redis = services["redis"]
    password = "s3cret-" + "x" * 20
    secret = tmp_path / "redis_password"
    secret.write_text(password)  # no trailing newline: `read` must still take it
    port = free_port()
    script = _script(redis).replace("$$", "$")  # compose's escape for a literal $
    swaps = {
        "/run/secrets/redis_password": str(secret),
        "/tmp/secret.conf": str(tmp_path / "secret.conf"),
        f"chown redis:redis {tmp_path / 'secret.conf'}\n": "",
        "exec docker-entrypoint.sh redis-server": "exec redis-server",
    }
    for old, new in swaps.items():
        assert old in script, old
        script = script.replace(old, new)
    script = script.rstrip("\n") + f" --port {port} --bind 127.0.0.1 --dir {tmp_path} --save ''\n"
    server = subprocess.Popen(["sh", "-ec", script], env={"PATH": "/usr/bin:/bin"})
    try:
        wait_for_port(port, proc=server)
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()
        assert (tmp_path / "secret.conf").stat().st_mode & 0o077 == 0
        with Redis(port=port, password=password) as client:
            assert client.ping() is True
            assert client.config_get("appendonly") == {"appendonly": "yes"}
        with Redis(port=port) as anonymous, pytest.raises(AuthenticationError):
            anonymous.ping()

        check = redis["healthcheck"]["test"][1].replace("$$", "$")
        check = check.replace("/run/secrets/redis_password", str(secret))
        check = check.replace("| redis-cli |", f"| redis-cli -p {port} |")
        assert subprocess.run(["sh", "-c", check], timeout=30).returncode == 0
        secret.write_text("wrong-password")
        assert subprocess.run(["sh", "-c", check], timeout=30).returncode != 0
    finally:
        stop_process(server)


CLUSTER_NODES = [f"redis-node-{i}" for i in range(1, 7)]


def test_the_cluster_profile_is_six_nodes_formed_once_with_the_password_off_command_lines(
    services: dict[str, dict],
) -> None:
    """docs/data-tier.md's cluster under compose: 3 primaries + 3 replicas, AOF always,
    min-replicas-to-write 1, the same password secret; only with --profile cluster."""
    in_profile = {
        name for name, service in services.items() if service.get("profiles") == ["cluster"]
    }
    assert in_profile == {*CLUSTER_NODES, "redis-cluster-init"}
    for name in CLUSTER_NODES:
        node = services[name]
        start = _script(node).strip().splitlines()[-1]
        assert start.startswith("exec docker-entrypoint.sh redis-server /tmp/secret.conf "), name
        for option in (
            "--cluster-enabled yes",
            "--appendonly yes",
            '--appendfsync "${APPENDFSYNC:-always}"',
            "--min-replicas-to-write 1",
            '--cluster-announce-hostname "$$(hostname)"',
        ):
            assert option in start, (name, option)
        assert node["hostname"] == name  # what it announces, and its name on the network
        assert node["volumes"] == [f"{name}:/data"]
        assert node["secrets"] == ["redis_password"] and "ports" not in node
    init = services["redis-cluster-init"]
    script = _script(init)
    assert "--cluster create $$nodes --cluster-replicas 1 --cluster-yes" in script
    # The password reaches redis-cli on its stdin, on every call.
    calls = [line for line in script.splitlines() if "redis-cli " in line]
    assert calls and all(
        "--askpass" in line and "< /run/secrets/redis_password" in line for line in calls
    )
    assert "grep -q '^cluster_known_nodes:6'" in script  # formed once, left alone after
    assert set(init["depends_on"]) == set(CLUSTER_NODES)
    # The app and the mail worker follow REDIS_CLUSTER_NODES when it is given.
    for name in ("app", "mail"):
        assert services[name]["environment"]["REDIS_CLUSTER_NODES"] == "${REDIS_CLUSTER_NODES:-}"


def test_the_cluster_node_start_script_runs_a_cluster_node_with_the_password_from_its_file(
    services: dict[str, dict], tmp_path: Path
) -> None:
    """One node's shell lines, run here against a real redis-server as the redis
    service's are above: cluster mode, AOF, min-replicas-to-write, requirepass and
    masterauth from the secret file, none of it on the command line."""
    password = "s3cret-" + "y" * 20
    secret = tmp_path / "redis_password"
    secret.write_text(password + "\n")
    port = free_port()
    script = _script(services["redis-node-1"]).replace("$$", "$")
    swaps = {
        "/run/secrets/redis_password": str(secret),
        "/tmp/secret.conf": str(tmp_path / "secret.conf"),
        f"chown redis:redis {tmp_path / 'secret.conf'}\n": "",
        "exec docker-entrypoint.sh redis-server": "exec redis-server",
        '"${APPENDFSYNC:-always}"': "always",
    }
    for old, new in swaps.items():
        assert old in script, old
        script = script.replace(old, new)
    # The bus port is port + 10000 unless told: a free one, beside other tests' ports.
    local = f" --port {port} --cluster-port {free_port()} --bind 127.0.0.1 --dir {tmp_path}"
    script = script.rstrip("\n") + local + " --save ''\n"
    server = subprocess.Popen(["sh", "-ec", script], env={"PATH": "/usr/bin:/bin"})
    try:
        wait_for_port(port, proc=server)
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()
        with Redis(port=port, password=password, decode_responses=True) as client:
            assert client.info("cluster")["cluster_enabled"] == 1
            settings = client.config_get("*")
            assert settings["appendonly"] == "yes" and settings["appendfsync"] == "always"
            assert settings["min-replicas-to-write"] == "1"
            assert settings["repl-diskless-sync-delay"] == "0"  # as app/ops/redis_cluster.py
            assert settings["cluster-require-full-coverage"] == "no"  # as the runner
            assert settings["masterauth"] == password  # its replica role authenticates too
            assert settings["cluster-preferred-endpoint-type"] == "hostname"
        with Redis(port=port) as anonymous, pytest.raises(AuthenticationError):
            anonymous.ping()
    finally:
        stop_process(server)
