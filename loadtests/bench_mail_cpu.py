"""CPU per mail of the mail worker, without the stack: one worker drains a backlog.

    .venv/bin/python -m loadtests.bench_mail_cpu [--mails 20000] [--workers 1]
        [--set MAIL_X=value] [--profile out.txt]

Starts a redis-server (AOF, appendfsync always, as the stack's), writes
``--mails`` completed orders and their ``order.completed`` events the way the
order scripts leave them, starts the discarding SMTP sink
(loadtests/smtp_discard.py) and ``--workers`` ``python -m mail`` processes with
make run's defaults (but ``--set``), and waits until every mail was accepted.
Prints the workers' CPU (user + system, from /proc) per mail, redis's CPU per
mail, the drain rate and the sink's duplicates. With ``--profile``, py-spy
records the first worker meanwhile (raw folded stacks into that file) and the
top frames by own and inclusive time are printed.

What ``make bench``'s mail section (loadtests/bench_mail_lag.py) cannot tell
apart, because the workers share the stack's CPU there: the worker's own cost.
Run it under the bench lock (``flock /work/notes/bench.lock ...``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis

from app import keys
from app.ids import new_id
from app.ops.instances import ROOT, mail_argv
from app.partitions import PARTITIONS, partition_of
from app.vocabulary import COMPLETED, STATUSES, encode_items
from loadtests import rig
from loadtests.bench_drivers import folded_samples
from loadtests.support.servers import (
    clean_env,
    free_port,
    running_redis,
    stop_process,
    wait_for_port,
)

PHONES = 20


def seed(redis: Redis, mails: int) -> None:
    """``mails`` completed orders of 1-3 lines and their events, in pages."""
    phones = [new_id() for _ in range(PHONES)]
    pipe = redis.pipeline(transaction=False)
    for index, phone in enumerate(phones):
        pipe.hset(keys.phone(phone), mapping={"id": phone, "name": f"Phone {index}"})
    pipe.execute()
    for start in range(0, mails, 1000):
        pipe = redis.pipeline(transaction=False)
        for n in range(start, min(mails, start + 1000)):
            order_id, customer_id = new_id(), new_id()
            lines = [(phones[(n + k) % PHONES], 1 + k, 19_900 + 100 * k) for k in range(1 + n % 3)]
            pipe.hset(
                keys.customer(customer_id),
                mapping={
                    "id": customer_id,
                    "name": "Ada",
                    "surname": "Lovelace",
                    "email": f"customer{n}@example.test",
                    "balance_cents": 100_000,
                },
            )
            pipe.hset(
                keys.order(order_id),
                mapping={
                    "id": order_id,
                    "customer_id": customer_id,
                    "status": COMPLETED,
                    "items": encode_items(lines),
                    "total_cents": sum(q * c for _, q, c in lines),
                    "seq": 1,
                    "created_at": time.time_ns() // 1_000_000,
                    "request_id": "bench",
                },
            )
            pipe.xadd(
                keys.events(partition_of(order_id)),
                {
                    "type": STATUSES[COMPLETED].event,
                    "order_id": order_id,
                    "customer_id": customer_id,
                    "status": COMPLETED,
                    "request_id": "bench",
                    "balance_cents": "90000",
                    "at": str(time.time_ns() // 1_000_000),
                },
            )
        pipe.execute()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_mail_cpu", description=__doc__)
    parser.add_argument("--mails", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="MAIL_X=value")
    parser.add_argument("--profile", type=Path, help="py-spy raw output of the first worker")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    with (
        tempfile.TemporaryDirectory(prefix="bench-mail-cpu-") as tmp,
        running_redis(Path(tmp) / "redis") as server,
    ):
        redis = Redis.from_url(server.url, decode_responses=True)
        for partition in range(PARTITIONS):
            redis.xgroup_create(keys.events(partition), keys.MAIL_GROUP, id="0", mkstream=True)
        seed(redis, args.mails)
        port, summary = free_port(), Path(tmp) / "sink.json"
        sink = subprocess.Popen(
            [sys.executable, "-m", "loadtests.smtp_discard", str(port), str(summary)],
            cwd=ROOT,
            env=clean_env(PYTHONPATH=str(ROOT)),
        )
        wait_for_port(port, proc=sink)
        redis_cpu = rig.cpu_seconds([server.proc.pid])
        procs = [
            subprocess.Popen(
                mail_argv(),
                cwd=ROOT,
                env=clean_env(
                    **settings,
                    REDIS_URL=server.url,
                    SMTP_HOST="127.0.0.1",
                    SMTP_PORT=str(port),
                    MAIL_WORKER_NAME=f"cpu-{index}",
                    LOG_LEVEL=settings.get("LOG_LEVEL", "INFO"),
                    PYTHONPATH=str(ROOT),
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for index in range(args.workers)
        ]
        spy = None
        if args.profile:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "-p",
                    str(procs[0].pid),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(args.profile),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        began = time.monotonic()
        try:
            sent = 0
            while sent < args.mails and time.monotonic() - began < 600:
                time.sleep(0.2)
                pending = lag = 0
                for partition in range(PARTITIONS):
                    stream = keys.events(partition)
                    pending += redis.xpending(stream, keys.MAIL_GROUP)["pending"]
                    info = [g for g in redis.xinfo_groups(stream) if g["name"] == keys.MAIL_GROUP]
                    lag += info[0]["lag"] or 0
                sent = args.mails - lag - pending
            elapsed = time.monotonic() - began
            worker_cpu = rig.cpu_seconds([p.pid for p in procs])
            redis_cpu = rig.cpu_seconds([server.proc.pid]) - redis_cpu
        finally:
            if spy is not None:
                stop_process(spy, sig=2)
            for proc in procs:
                stop_process(proc)
            stop_process(sink)
        dead = sum(redis.xlen(keys.mail_dead(p)) for p in range(PARTITIONS))
        redis.close()
        tally = json.loads(summary.read_text()) if summary.exists() else {}
    print(
        f"{sent} mails in {elapsed:.1f} s ({sent / elapsed:,.0f}/s) by {args.workers} worker(s)"
        f" ({settings or 'defaults'}): worker CPU {1000 * worker_cpu / max(1, sent):.3f} ms/mail,"
        f" redis CPU {1000 * redis_cpu / max(1, sent):.3f} ms/mail;"
        f" sink: {tally.get('mails')} mails, {tally.get('duplicates')} duplicates,"
        f" peak {tally.get('peak_open_sessions')} sessions; dead letters {dead}"
    )
    if args.profile and args.profile.exists():
        print_profile(args.profile)
    return 0


def print_profile(raw: Path, rows: int = 25) -> None:
    """Top frames of py-spy's folded stacks, by own and by inclusive samples."""
    total, own, inclusive = folded_samples(raw)
    for title, table in (("own", own), ("inclusive", inclusive)):
        print(f"-- py-spy, {total} samples, by {title} time")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:rows]:
            print(f"{100 * n / max(1, total):5.1f}%  {frame}")


if __name__ == "__main__":
    sys.exit(main())
