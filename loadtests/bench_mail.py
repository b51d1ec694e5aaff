"""Mail sending throughput: one reused SMTP connection against a new connection
per mail, to the local dev sink, in one run.

    .venv/bin/python -m loadtests.bench_mail [--mails 500] [--rounds 3]

Starts ``python -m mail.sink`` on a free 127.0.0.1 port (saving into a temp
folder that is removed afterwards), or uses a running sink with ``--port``.
Renders the confirmation mails first, then sends them sequentially with
``mail.worker.SmtpSender`` in both modes, alternating the modes each round, and
prints mails/s per mode (the median round) and the ratio. Goal: reuse >= 3x.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.ids import new_id
from mail.render import MailLine, OrderMail, render_confirmation
from mail.settings import MailSettings
from mail.worker import SmtpSender
from tests.servers import clean_env, free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


def messages(settings: MailSettings, count: int) -> list:
    sender = settings.from_address
    out = []
    for i in range(count):
        mail = OrderMail(
            order_id=new_id(),
            customer_name="Ada",
            customer_surname="Lovelace",
            email=f"ada{i}@example.test",
            lines=(
                MailLine(new_id(), "Pixel 9", 2, 79_900),
                MailLine(new_id(), "Galaxy S25", 1, 99_900),
            ),
            total_cents=259_700,
            balance_cents=123_45,
        )
        rendered = render_confirmation(mail, sender=sender, mail_domain=settings.mail_domain)
        out.append((rendered.raw, rendered.recipient))
    return out


async def send_all(settings: MailSettings, batch: list, *, reuse: bool) -> tuple[float, int]:
    sender = SmtpSender(settings, reuse=reuse)
    started = time.perf_counter()
    for raw, rcpt in batch:
        await sender.send(raw, settings.from_address.addr_spec, [rcpt])
    await sender.close()
    return time.perf_counter() - started, sender.connections_opened


async def bench(port: int, mails: int, rounds: int) -> None:
    settings = MailSettings(smtp_port=port, worker_name="bench")
    batch = messages(settings, mails)
    await send_all(settings, batch[: min(20, mails)], reuse=True)  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    connections: dict[bool, int] = {}
    for round_no in range(rounds):
        order = (True, False) if round_no % 2 == 0 else (False, True)
        for reuse in order:
            elapsed, opened = await send_all(settings, batch, reuse=reuse)
            rates[reuse].append(mails / elapsed)
            connections[reuse] = opened
            label = "reused connection" if reuse else "new connection per mail"
            print(f"  round {round_no + 1}: {label:<24} {mails / elapsed:8.0f} mails/s")
    reused, fresh = statistics.median(rates[True]), statistics.median(rates[False])
    print()
    print(f"mails per round: {mails}, rounds: {rounds}, sink on 127.0.0.1:{port} (median round)")
    print(f"reused connection:       {reused:8.0f} mails/s  ({connections[True]} connection)")
    print(f"new connection per mail: {fresh:8.0f} mails/s  ({connections[False]} connections)")
    print(f"ratio:                   {reused / fresh:8.1f}x  (goal >= 3x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=500, help="mails per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, help="use a sink already listening on this port")
    args = parser.parse_args()
    if args.port:
        asyncio.run(bench(args.port, args.mails, args.rounds))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-mail-") as directory:
        port = free_port()
        sink = subprocess.Popen(
            [sys.executable, "-m", "mail.sink"],
            cwd=ROOT,
            env=clean_env(SMTP_PORT=str(port), MAIL_SINK_DIR=directory, LOG_LEVEL="WARNING"),
        )
        try:
            wait_for_port(port, proc=sink)
            asyncio.run(bench(port, args.mails, args.rounds))
        finally:
            stop_process(sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
