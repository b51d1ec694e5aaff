"""Mail sending throughput: one reused SMTP connection against a new connection
per mail, to the local dev sink, in one run.

    .venv/bin/python -m loadtests.bench_mail [--mails 500] [--rounds 3]

Starts ``python -m mail.sink`` on a free 127.0.0.1 port (saving into a temp
folder that is removed afterwards), renders the confirmation mails first, then
sends them one after the other with ``mail.smtp.SmtpSender`` in both modes,
alternating which mode goes first each round, and prints mails/s per mode (the
median round) and the ratio. Goal: reuse >= 3x. It runs once over plain SMTP
and once over STARTTLS (a self-signed certificate made with openssl, trusted
through SMTP_CA_FILE), as a production relay would require.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app.ids import new_id
from loadtests.support.mail_sink import running_sink
from mail.render import MailLine, OrderMail, render_confirmation
from mail.settings import MailSettings
from mail.smtp import SmtpSender


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


async def bench(settings: MailSettings, mails: int, rounds: int) -> tuple[float, float]:
    batch = messages(settings, mails)
    await send_all(settings, batch[: min(20, mails)], reuse=True)  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    for round_no in range(rounds):
        order = (True, False) if round_no % 2 == 0 else (False, True)
        for reuse in order:
            elapsed, opened = await send_all(settings, batch, reuse=reuse)
            assert opened == (1 if reuse else mails)
            rates[reuse].append(mails / elapsed)
            label = "reused connection" if reuse else "new connection per mail"
            print(f"  round {round_no + 1}: {label:<24} {mails / elapsed:8.0f} mails/s")
    return statistics.median(rates[True]), statistics.median(rates[False])


def report(title: str, mails: int, rounds: int, reused: float, fresh: float) -> None:
    print(f"{title}: {mails} mails per mode and round, {rounds} rounds, median round")
    print(f"  reused connection:       {reused:8.0f} mails/s  (1 connection)")
    print(f"  new connection per mail: {fresh:8.0f} mails/s  ({mails} connections)")
    print(f"  ratio:                   {reused / fresh:8.1f}x  (goal >= 3x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=500, help="mails per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tls-mails", type=int, default=100, help="mails per mode and round over STARTTLS"
    )
    parser.add_argument("--no-tls", action="store_true", help="skip the STARTTLS run")
    args = parser.parse_args()
    modes = [("plain SMTP", False, args.mails)]
    if not args.no_tls and shutil.which("openssl"):
        modes.append(("STARTTLS", True, args.tls_mails))
    results = []
    for title, tls, mails in modes:
        print(f"{title}:")
        with (
            tempfile.TemporaryDirectory(prefix="bench-mail-") as tmp,
            running_sink(Path(tmp), tls=tls) as sink,
        ):
            settings = MailSettings(
                smtp_port=sink.port,
                smtp_tls="starttls" if tls else "none",
                smtp_ca_file=str(sink.cert) if sink.cert else "",
                worker_name="bench",
            )
            results.append((title, mails, *asyncio.run(bench(settings, mails, args.rounds))))
    print()
    for title, mails, reused, fresh in results:
        report(title, mails, args.rounds, reused, fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
