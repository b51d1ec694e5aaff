"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine here):
services, health checks, dependencies, published ports, and the nginx config
the compose stack mounts, which must be fresh and pass `nginx -t`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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


def test_redis_has_aof_and_requires_a_password(services: dict[str, dict]) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${REDIS_PASSWORD:?")  # compose refuses to start without it
    assert "${REDIS_PASSWORD:?" in services["app"]["environment"]["REDIS_URL"]
    assert "${REDIS_PASSWORD:?" in services["mail"]["environment"]["REDIS_URL"]
    assert "ports" not in redis


def test_app_runs_gunicorn_conf_and_stops_after_graceful_timeout(
    services: dict[str, dict],
) -> None:
    app = services["app"]
    assert app["command"] == ["gunicorn", "--config", "gunicorn.conf.py"]
    grace = int(app["stop_grace_period"].removesuffix("s"))
    graceful = int(re.search(r":-(\d+)", app["environment"]["WEB_GRACEFUL_TIMEOUT"]).group(1))
    assert graceful < grace
    assert "${ADMIN_TOKEN:?" in app["environment"]["ADMIN_TOKEN"]


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
        "server app:8000 ": "server 127.0.0.1:8000 ",
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
    assert compose["secrets"][secret["source"]] == {"environment": "ADMIN_TOKEN"}
    assert "ADMIN_TOKEN" not in json.dumps(config)  # the token is never in the file

    mail_job = jobs["phoneshop-mail"]
    [target] = mail_job["static_configs"][0]["targets"]
    host, port = target.split(":")
    mail = services["mail"]
    assert host == "mail"
    assert mail["environment"]["MAIL_METRICS_PORT"] == port
    assert mail["environment"]["MAIL_METRICS_ADDRESS"] == "0.0.0.0"
    assert port in mail["expose"]
