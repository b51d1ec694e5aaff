"""The mail side of a fault test's stack: the dev SMTP sink and mail workers as real
processes (``python -m mail.sink``, ``python -m mail``), pointed at the stack's data tier
(one redis-server or the cluster: ``FullStack.redis_env``), and the questions a fault
test asks of them afterwards: which Message-IDs arrived, and has every mail settled."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import keys
from app.ops.instances import ROOT, mail_argv, mail_sink_argv
from app.partitions import PARTITIONS, partition_of
from loadtests.support.servers import clean_env, free_port, stop_process, wait_for_port
from mail import render
from mail.settings import MailSettings


def message_id(order_id: str) -> str:
    """The Message-ID of an order's confirmation, with the default MAIL_DOMAIN."""
    return render.message_id(order_id, MailSettings.mail_domain)


@dataclass
class MailSide:
    """The dev SMTP sink and the mail workers, as real processes."""

    redis_env: Mapping[str, str]
    directory: Path
    smtp_port: int = field(default_factory=free_port)
    sink: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def mail_dir(self) -> Path:
        return self.directory / "mail"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            **self.redis_env,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(self.smtp_port),
            SMTP_TIMEOUT_SECONDS="3",
            MAIL_SINK_DIR=str(self.mail_dir),
            # Above twice SMTP_TIMEOUT_SECONDS: a whole send may take half of it.
            MAIL_CLAIM_IDLE_SECONDS="7",
            MAIL_BACKOFF_BASE_SECONDS="0.2",
            MAIL_BACKOFF_MAX_SECONDS="1",
            MAIL_MAX_ATTEMPTS="40",
            PYTHONPATH=str(ROOT),
            **extra,
        )

    def start_sink(self) -> None:
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        with (self.directory / "sink.log").open("ab") as log:
            self.sink = subprocess.Popen(
                mail_sink_argv(),
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=log,
            )
        wait_for_port(self.smtp_port, proc=self.sink)

    def stop_sink(self) -> None:
        if self.sink is not None:
            stop_process(self.sink)
            self.sink = None

    def start_worker(self, name: str) -> None:
        with (self.directory / f"{name}.log").open("ab") as log:
            self.workers[name] = subprocess.Popen(
                mail_argv(),
                cwd=ROOT,
                env=self.env(MAIL_WORKER_NAME=name),
                stdout=log,
                stderr=log,
            )

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        # SIGTERM to every worker at once (a stop waits for the worker's blocked read,
        # up to a second), then each waited for (a second SIGTERM changes nothing).
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers.values():
            stop_process(proc)
        self.workers.clear()
        self.stop_sink()

    def delivered_message_ids(self) -> list[str]:
        """The Message-ID of every .eml the sink saved, once per file."""
        ids = []
        for path in sorted(self.mail_dir.glob("*.eml")):
            for line in path.read_text(errors="replace").splitlines():
                if line.lower().startswith("message-id:"):
                    ids.append(line.split(":", 1)[1].strip())
                    break
        return ids


async def mail_settled(redis: Redis | RedisCluster, order_ids: Iterable[str]) -> bool:
    """Every one of ``order_ids`` is marked sent or is in its partition's dead letters,
    and no partition's stream has an entry the mail group holds unacknowledged."""
    for order_id in order_ids:
        if not await redis.exists(keys.mail_sent(order_id)):
            dead = await redis.xrange(keys.mail_dead(partition_of(order_id)))
            if order_id not in {f["order_id"] for _, f in dead}:
                return False
    for partition in range(PARTITIONS):
        groups = await redis.xinfo_groups(keys.events(partition))
        if any(g["pending"] for g in groups if g["name"] == keys.MAIL_GROUP):
            return False
    return True
