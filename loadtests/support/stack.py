"""The whole stack on free 127.0.0.1 ports, as real processes.

tests/stack.py wraps it in the ``full_stack`` fixtures; loadtests/stack.py
starts it for a load run.

What runs (nothing mocked):

* one redis-server (loadtests.support.servers.RedisServer, AOF, appendfsync always),
  or, with ``cluster=``, a Redis Cluster its caller started and stops (the app and
  the mail worker then reach it through REDIS_CLUSTER_NODES, as ``make run`` wires it);
* ``instances`` gunicorn instances (default 2) x ``workers`` workers (default 2),
  each ``gunicorn --config gunicorn.conf.py`` i.e. ``app.main:create_app``,
  each in its own process group so it can be killed as a whole;
* nginx, rendered by nginx/render.py into the stack's temp folder, listening
  on a free HTTP port and on free seed phones / seed orders ports.

``start_full_stack(directory, **options)``
    A context manager for a stack of your own, e.g. with ``MAX_INFLIGHT=2``::

        with start_full_stack(tmp_path, env={"MAX_INFLIGHT": "2"}) as stack: ...

The rate limits are the production defaults for writes (NginxConfig's, per
bearer token or address) and higher for reads (2000 r/s, burst 4000), so
that GET loops in fault tests measure failover, not the read limiter. Bulk
set-up writes should go to ``stack.direct_url`` (one instance, no nginx) or
use several tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from app.ops.instances import ROOT, die_with_parent, gunicorn_argv
from app.ops.poll import wait_until
from app.ops.redis_cluster import HOST, LocalCluster, free_ports
from loadtests.support.servers import RedisServer, clean_env, wait_for_port
from nginx.render import NginxConfig, write

STACK_ADMIN_TOKEN = "stack-admin-token-0123456789abcdef"
STARTUP_TIMEOUT = 30.0

# Read limits high enough that a tight GET loop is never the thing measured.
STACK_LIMITS = {"LIMIT_READ_RATE": "2000r/s", "LIMIT_READ_BURST": "4000"}


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """GET url and return its status, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, urllib.error.URLError):
        return None


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class AppInstance:
    """One gunicorn master and its workers on one port, in their own process group."""

    index: int
    port: int
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> None:
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                gunicorn_argv(),
                cwd=ROOT,
                env={**self.env, "WEB_BIND": f"127.0.0.1:{self.port}"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() takes the workers too
                preexec_fn=die_with_parent,  # and a dead pytest takes the master
            )
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        wait_for_port(self.port, timeout=timeout, proc=self.proc)
        wait_until(
            lambda: http_status(f"{self.url}/healthz", timeout=2) == 200,
            f"instance {self.index} to answer /healthz (log: {self.log_path})",
            timeout,
        )

    def kill(self) -> None:
        """kill -9 the master and every worker at once: the instance vanishes."""
        if self.proc is None:
            return
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the master: gunicorn's graceful stop. Returns its exit status."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            # Workers of a master that died without reaping them.
            _signal_group(proc.pid, signal.SIGKILL)

    def restart(self) -> None:
        self.terminate()
        self.start()


@dataclass
class NginxServer:
    directory: Path
    config: NginxConfig
    proc: subprocess.Popen | None = None

    @property
    def conf_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    @property
    def access_log(self) -> Path:
        return Path(self.config.access_log)

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        write(self.config, self.conf_path)
        ports = [
            p
            for p in (
                self.config.http_port,
                self.config.seed_phones_port,
                self.config.seed_orders_port,
            )
            if p
        ]
        with self.error_log.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-p", f"{self.directory}/", "-c", str(self.conf_path), "-e", "stderr"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        for port in ports:
            wait_for_port(port, timeout=STARTUP_TIMEOUT, proc=self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGQUIT)  # graceful: finish open requests
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)


@dataclass
class FullStack:
    # The data tier: the stack's own redis-server, or None on a cluster (``cluster``),
    # whose nodes its caller starts, kills and stops.
    redis: RedisServer | None
    instances: list[AppInstance]
    nginx: NginxServer
    admin_token: str = STACK_ADMIN_TOKEN
    env: Mapping[str, str] = field(default_factory=dict)
    cluster: LocalCluster | None = None

    @property
    def redis_env(self) -> dict[str, str]:
        """What points a process at this stack's data tier (the mail worker too)."""
        names = ("REDIS_URL", "REDIS_CLUSTER_NODES")
        return {name: self.env[name] for name in names if name in self.env}

    # ---- where to send requests ------------------------------------------------
    @property
    def http_url(self) -> str:
        """The whole API through nginx (HTTP_PORT)."""
        return f"http://127.0.0.1:{self.nginx.config.http_port}"

    @property
    def seed_phones_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx.config.seed_phones_port}"

    @property
    def seed_orders_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx.config.seed_orders_port}"

    @property
    def instance_urls(self) -> list[str]:
        return [instance.url for instance in self.instances]

    @property
    def direct_url(self) -> str:
        """A running instance, bypassing nginx and its rate limits (for set-up)."""
        for instance in self.instances:
            if instance.running:
                return instance.url
        raise RuntimeError("no app instance is running")

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    # ---- faults --------------------------------------------------------------------
    def kill_instance(self, index: int) -> None:
        """SIGKILL instance ``index``: master and workers, no goodbye."""
        self.instances[index].kill()

    def terminate_instance(self, index: int, timeout: float = 30.0) -> int | None:
        """SIGTERM instance ``index`` and wait for its graceful exit; returns its status."""
        return self.instances[index].terminate(timeout)

    def start_instance(self, index: int) -> None:
        self.instances[index].start()

    def restart_instance(self, index: int) -> None:
        self.instances[index].restart()

    def stop_redis(self) -> None:
        assert self.redis is not None, "a cluster's nodes are its owner's to stop"
        self.redis.stop()

    def kill_redis(self) -> None:
        assert self.redis is not None, "a cluster's nodes are its owner's to kill"
        self.redis.kill()

    def start_redis(self) -> None:
        """Start Redis again on the same port and folder (the AOF brings the data back)."""
        if self.redis is None:
            return
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.proc = None
            self.redis.start()

    # ---- lifecycle -------------------------------------------------------------------
    def heal(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Bring every process back and wait until nginx serves /readyz again."""
        self.start_redis()
        for instance in self.instances:
            if not instance.running:
                instance.proc = None
                instance.start()
        # nginx may still hold an instance as failed (fail_timeout) after a fault, and
        # sends everything to the others meanwhile; a later fault on those would then
        # find no live upstream. nginx keeps failures per upstream: wait until it has
        # served each instance through both, the probes' (/readyz, app_uncapped) and
        # the API's (a catalogue read, app). One id per path for the whole wait: a
        # buffered access log (make run's) shows the lines of earlier rounds once it
        # flushes.
        every = {i.port for i in self.instances}
        for path in ("/readyz", "/phones?per_page=1"):
            probe = f"heal-{uuid.uuid4().hex}"
            wait_until(
                lambda path=path, probe=probe: self._instances_nginx_served(probe, path) >= every,
                f"nginx to serve {path} from every instance again",
                timeout,
            )

    def _instances_nginx_served(self, probe: str, path: str) -> set[int]:
        """Ports of the instances that served a request with this id through nginx."""
        for _ in range(2 * len(self.instances)):
            request = urllib.request.Request(
                f"{self.http_url}{path}", headers={"X-Request-ID": probe}
            )
            with contextlib.suppress(OSError):
                urllib.request.urlopen(request, timeout=5).close()
        ports = set()
        with contextlib.suppress(FileNotFoundError):
            text = self.nginx.access_log.read_text()
            # Complete lines only: nginx writes its buffered log in chunks, and a chunk
            # may end inside a line (read then, it failed to parse; the poll reads again).
            for line in text[: text.rfind("\n") + 1].splitlines():
                if probe in line:
                    entry = json.loads(line)
                    if entry.get("status") == 200:
                        # "a:1, b:2" when nginx tried more than one: the last one answered.
                        ports.add(int(entry["upstream_addr"].rsplit(":", 1)[1]))
        return ports

    def stop(self) -> None:
        self.nginx.stop()
        # Each instance's graceful stop takes about a second: all of them at once.
        with ThreadPoolExecutor(max(1, len(self.instances))) as pool:
            stopping = [pool.submit(instance.terminate, 15) for instance in self.instances]
        for stopped in stopping:
            with contextlib.suppress(subprocess.TimeoutExpired):
                stopped.result()
        if self.redis is not None:
            self.redis.stop()


@contextlib.contextmanager
def start_full_stack(
    directory: Path,
    *,
    instances: int = 2,
    workers: int = 2,
    env: Mapping[str, str] | None = None,
    nginx: Mapping[str, object] | None = None,
    cluster: LocalCluster | None = None,
) -> Iterator[FullStack]:
    """Start redis, ``instances`` x ``workers`` app processes and nginx; stop them all after.

    ``env`` is added to the app instances' and the renderer's environment
    (e.g. MAX_INFLIGHT, LIMIT_WRITE_RATE); ``nginx`` overrides NginxConfig fields.
    ``cluster``: a running Redis Cluster to use instead of a redis-server of the stack's own.
    """
    directory.mkdir(parents=True, exist_ok=True)
    extra = dict(env or {})
    # Every port of the stack distinct: taken one at a time, the kernel once gave an
    # instance and nginx the same one (nginx could not bind, and the instance answered
    # on its port).
    ports = iter(free_ports(instances + 4))
    if cluster is None:
        redis: RedisServer | None = RedisServer(directory=directory / "redis", port=next(ports))
        data_tier = {"REDIS_URL": redis.url}
    else:
        redis = None
        # REDIS_URL gives the cluster only its password and TLS (none here).
        data_tier = {
            "REDIS_URL": f"redis://{HOST}/0",
            "REDIS_CLUSTER_NODES": ",".join(f"{HOST}:{port}" for port in cluster.ports),
        }
    defaults = {
        **data_tier,
        "ADMIN_TOKEN": STACK_ADMIN_TOKEN,
        "BENCH_ROUTES": "1",
        "BEHIND_PROXY": "1",
        "WEB_CONCURRENCY": str(workers),
        "WEB_ACCESS_LOG": "",
    }
    app_env = clean_env(**{**defaults, **extra})  # env may override any default
    app_instances = [
        AppInstance(
            index=i,
            port=next(ports),
            env=app_env,
            log_path=directory / f"instance-{i}.log",
        )
        for i in range(instances)
    ]
    render_env = {**STACK_LIMITS, **extra}
    config = NginxConfig.from_env(
        render_env,
        upstreams=tuple(f"127.0.0.1:{instance.port}" for instance in app_instances),
        http_port=next(ports),
        seed_phones_port=next(ports),
        seed_orders_port=next(ports),
        worker_processes="1",
        var_dir=str(directory / "nginx"),
        access_log=str(directory / "nginx" / "access.log"),
        error_log="stderr",
    )
    if "NGINX_ACCESS_LOG_BUFFER" not in render_env:
        # Tests read the access log as soon as their request is answered.
        config = dataclasses.replace(config, access_log_buffer="off")
    if nginx:
        config = dataclasses.replace(config, **nginx)
    stack = FullStack(
        redis=redis,
        instances=app_instances,
        nginx=NginxServer(directory=directory / "nginx", config=config),
        env=app_env,
        cluster=cluster,
    )
    try:
        if redis is not None:
            redis.start()
        for instance in app_instances:
            instance.start(wait=False)
        for instance in app_instances:
            instance.wait_healthy()
        stack.nginx.start()
        stack.heal()
        yield stack
    finally:
        stack.stop()
