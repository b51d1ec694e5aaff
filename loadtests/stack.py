"""A fresh PhoneShop stack for `make loadtest` and `make bench`, on 127.0.0.1 only.

It is the test suite's stack (loadtests/support/stack.py: redis-server with AOF, gunicorn
instances, nginx rendered by nginx/render.py), started in a temp folder on free
ports (or HTTP_PORT when set), plus, when asked, the mail worker
(``python -m mail``) and the dev SMTP sink (``python -m mail.sink``). Everything
is stopped on exit, and every child dies with its parent (PR_SET_PDEATHSIG).

    python -m loadtests.stack          # run one in the foreground until Ctrl-C
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.env import env_int
from app.ops.instances import ROOT, die_with_parent, mail_argv, mail_sink_argv
from loadtests.support.servers import clean_env, free_port, stop_process, wait_for_port
from loadtests.support.stack import FullStack, start_full_stack
from nginx.render import NginxConfig

# Rate limits of the load-test stack. The write limit is left at the production
# default (NginxConfig's, per bearer token): each simulated customer has its
# own token and stays far below it. Reads get more room, and so do connections
# and requests from one address: every Locust user comes from 127.0.0.1, so the
# per-address limit (by default twice one token's reads) would cap the whole
# offered load and the app's own overload control would never be reached.
LOADTEST_LIMITS = {
    "LIMIT_READ_RATE": "2000r/s",
    "LIMIT_READ_BURST": "4000",
    "LIMIT_ADDRESS_RATE": "1000000r/s",
    "LIMIT_ADDRESS_BURST": "1000000",
    "LIMIT_CONN": "2000",
}


@dataclass
class MailProcesses:
    sink: subprocess.Popen
    worker: subprocess.Popen
    smtp_port: int
    sink_dir: Path

    def stop(self) -> None:
        stop_process(self.worker)
        stop_process(self.sink)


@dataclass
class LoadStack:
    """The running stack and where to reach it."""

    stack: FullStack
    directory: Path
    mail: MailProcesses | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return self.stack.http_url

    @property
    def direct_url(self) -> str:
        return self.stack.direct_url

    @property
    def admin_token(self) -> str:
        return self.stack.admin_token

    @property
    def redis_url(self) -> str:
        return self.stack.redis.url

    @property
    def redis_port(self) -> int:
        return self.stack.redis.port

    @property
    def app_pids(self) -> list[int]:
        """Every gunicorn worker pid (children of the instance masters), for py-spy."""
        pids = []
        for instance in self.stack.instances:
            if instance.proc is None:
                continue
            children = Path(f"/proc/{instance.proc.pid}/task/{instance.proc.pid}/children")
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in children.read_text().split()]
        return pids


def _start_mail(directory: Path, redis_url: str) -> MailProcesses:
    smtp_port = free_port()
    sink_dir = directory / "mail"
    sink_dir.mkdir(parents=True, exist_ok=True)
    env = clean_env(
        REDIS_URL=redis_url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_port),
        MAIL_SINK_DIR=str(sink_dir),
        MAIL_WORKER_NAME="loadtest-mail",
        LOG_LEVEL="WARNING",
    )
    log = (directory / "mail.log").open("ab")
    sink = subprocess.Popen(
        mail_sink_argv(),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    wait_for_port(smtp_port, proc=sink)
    worker = subprocess.Popen(
        mail_argv(),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    return MailProcesses(sink=sink, worker=worker, smtp_port=smtp_port, sink_dir=sink_dir)


@contextlib.contextmanager
def launch(
    directory: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    instances: int = 2,
    workers: int = 1,
    http_port: int | None = None,
    mail: bool = False,
    appendfsync: str = "always",
) -> Iterator[LoadStack]:
    """Start the stack (and the mail processes when ``mail``); stop everything after.

    ``env`` goes to the app instances and to the nginx renderer, e.g.
    ``LIMIT_WRITE_RATE`` or ``MAX_INFLIGHT``. ``http_port`` None means
    HTTP_PORT from the environment, or a free port when that is unset or 0.
    """
    owned = directory is None
    if owned:
        directory = Path(tempfile.mkdtemp(prefix="phoneshop-load-"))
    if http_port is None:
        http_port = env_int(os.environ, "HTTP_PORT", 0, 0, 65535, error=SystemExit)
    nginx = {"http_port": http_port} if http_port else None
    # nginx's access log as make run writes it (buffered), not the test stack's.
    merged = {
        **LOADTEST_LIMITS,
        "NGINX_ACCESS_LOG_BUFFER": NginxConfig.access_log_buffer,
        **(env or {}),
    }
    with contextlib.ExitStack() as cleanup:
        if owned:
            cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
        with _started(directory, merged, instances, workers, nginx, mail, appendfsync) as running:
            yield running


@contextlib.contextmanager
def _started(
    directory: Path,
    merged: Mapping[str, str],
    instances: int,
    workers: int,
    nginx: dict[str, int] | None,
    mail: bool,
    appendfsync: str,
) -> Iterator[LoadStack]:
    with start_full_stack(
        directory, instances=instances, workers=workers, env=merged, nginx=nginx
    ) as stack:
        if appendfsync != stack.redis.appendfsync:
            stack.redis.cli("CONFIG", "SET", "appendfsync", appendfsync)
            stack.redis.appendfsync = appendfsync
        mail_procs = _start_mail(directory, stack.redis.url) if mail else None
        try:
            yield LoadStack(stack=stack, directory=directory, mail=mail_procs, env=merged)
        finally:
            if mail_procs is not None:
                mail_procs.stop()


def main() -> int:
    stop = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with launch(mail=True) as running:
        print(f"API (nginx)   {running.http_url}", flush=True)
        print(f"direct        {running.direct_url}", flush=True)
        print(f"redis         {running.redis_url}", flush=True)
        print(f"admin token   {running.admin_token}", flush=True)
        print(f"folder        {running.directory}", flush=True)
        while not stop:
            time.sleep(0.2)  # until Ctrl-C or SIGTERM sets ``stop``: no deadline, by design
    return 0


if __name__ == "__main__":
    sys.exit(main())
