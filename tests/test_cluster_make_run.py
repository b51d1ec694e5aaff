"""`REDIS_CLUSTER=1 make run`: the whole stack on a local 3 + 3 Redis Cluster, `make
status` listing every node with its role, and Ctrl-C leaving nothing running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from app.ops.poll import wait_until
from app.ops.redis_cluster import LocalCluster
from app.ops.status import check_cluster, read_env_file
from loadtests.support.servers import clean_env, free_port

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_NODES = 6
BUS_OFFSET = 10_000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _refuses(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return False
    return True


def cluster_base_port() -> int:
    """Six free ports in a row whose bus ports (+10000) are free too, below the
    ephemeral range where the other fixtures' free ports live."""
    return next(
        base
        for base in range(20_000 + os.getpid() % 5000, 30_000, 7)
        if all(
            _bindable(p) and _bindable(p + BUS_OFFSET) for p in range(base, base + CLUSTER_NODES)
        )
    )


def test_redis_cluster_1_make_run_serves_status_lists_nodes_and_ctrl_c_stops_all(
    tmp_path: Path,
) -> None:
    ports = {
        name: str(free_port())
        for name in ("HTTP_PORT", "SEED_PHONES_PORT", "SEED_ORDERS_PORT", "SMTP_PORT")
    }
    ports["APP_BASE_PORT"] = str(free_port())
    ports["MAIL_METRICS_PORT"] = str(free_port())
    ports["REDIS_CLUSTER_BASE_PORT"] = str(cluster_base_port())
    overridden = set(read_env_file(ROOT / ".env")) & {*ports, "REDIS_CLUSTER", "REDIS_CLUSTER_DIR"}
    if overridden:
        pytest.skip(f"this checkout's .env sets {sorted(overridden)}, which make run prefers")
    data = tmp_path / "redis-cluster"
    env = clean_env(
        **ports,
        REDIS_CLUSTER="1",
        REDIS_CLUSTER_DIR=str(data),
        ADMIN_TOKEN="test-admin-token-0123456789",
        WEB_INSTANCES="1",
        WEB_CONCURRENCY="1",
        MAIL_WORKERS="1",
        MAIL_SINK_DIR=str(tmp_path / "mail"),
        WEB_ACCESS_LOG=str(tmp_path / "web-access.log"),
    )
    for name in ("REDIS_URL", "REDIS_CLUSTER_NODES", "SMTP_HOST"):
        env.pop(name, None)
    log = (tmp_path / "make-run.log").open("w")
    # Its own session, so the SIGINT below reaches make and what it started as a
    # terminal's Ctrl-C reaches its foreground group, and nothing else.
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    status_env = {**env, "PYTHONPATH": str(ROOT)}
    cluster_ports = [int(ports["REDIS_CLUSTER_BASE_PORT"]) + i for i in range(CLUSTER_NODES)]
    try:
        last: list[str] = [""]

        def stack_up() -> bool:
            assert make.poll() is None, (tmp_path / "make-run.log").read_text()[-3000:]
            status = subprocess.run(
                [sys.executable, "-m", "app.ops.status", "--env-file", ""],
                cwd=ROOT,
                env=status_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            last[0] = status.stdout + status.stderr
            return status.returncode == 0

        try:
            wait_until(stack_up, "make status to say every process is up", 180, interval=1.0)
        except TimeoutError:
            pytest.fail(last[0] + (tmp_path / "make-run.log").read_text()[-3000:])
        report = last[0]
        for port in cluster_ports:
            assert f"redis 127.0.0.1:{port}" in report, report
        assert report.count(" primary ") == 3, report
        assert report.count("replica of 127.0.0.1:") == 3, report
        assert "cluster_state=ok" in report, report
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['HTTP_PORT']}/readyz") as ready:
            assert ready.status == 200

        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in make run's terminal sends
        make.wait(60)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        log.close()
    output = (tmp_path / "make-run.log").read_text()
    assert "sending SIGKILL" not in output, output[-3000:]  # every process stopped in time
    listening = [
        int(value) for name, value in ports.items() if name != "REDIS_CLUSTER_BASE_PORT"
    ] + cluster_ports
    assert [port for port in listening if not _refuses(port)] == []
    assert all((data / str(port) / "appendonlydir").is_dir() for port in cluster_ports)


def test_status_checks_every_node_of_a_cluster_and_says_when_none_answers(
    redis_cluster: LocalCluster,
) -> None:
    nodes = tuple(("127.0.0.1", port) for port in redis_cluster.ports[:2])
    checks = check_cluster(nodes)
    by_name = {check.name: check for check in checks}
    assert set(by_name) == {f"redis 127.0.0.1:{port}" for port in redis_cluster.ports} | {
        "redis cluster"
    }
    assert all(check.state == "OK" for check in checks), checks
    roles = [check.detail.split()[0] for check in checks[:-1]]
    assert sorted(roles) == ["primary"] * 3 + ["replica"] * 3
    assert "cluster_state=ok" in by_name["redis cluster"].detail

    (down,) = check_cluster((("127.0.0.1", free_port()),))
    assert (down.state, down.name) == ("DOWN", "redis cluster")
