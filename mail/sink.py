"""``python -m mail.sink``: the dev SMTP server. It accepts every message and
saves it, exactly as received, as one ``.eml`` file in MAIL_SINK_DIR
(default ``var/mail/``). Listens on 127.0.0.1:SMTP_PORT (default 1025) in the
foreground until SIGTERM or SIGINT. With MAIL_SINK_TLS_CERT and
MAIL_SINK_TLS_KEY (PEM files) it also offers STARTTLS, to try SMTP_TLS=starttls
(the worker then trusts that certificate through SMTP_CA_FILE).

File names sort by arrival time, so the newest mail is
``ls -1 var/mail/*.eml | tail -n 1``. Each file is written under a temporary
name and renamed, so a reader never sees half a mail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import ssl
import sys
from datetime import UTC, datetime
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from app.env import SettingsError, env_int

log = logging.getLogger("mail.sink")

HOST = "127.0.0.1"
DEFAULT_PORT = 1025
DEFAULT_DIR = "var/mail"
MAX_MESSAGE = 10 * 1024 * 1024


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


class SaveToDirectory:
    """aiosmtpd handler: every accepted message becomes ``<utc time>-<random>.eml``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.directory / f"{stamp}-{secrets.token_hex(4)}.eml"
        # A few kB to a local disk: cheaper inline than a hop to a thread.
        _write_atomically(path, content)
        self.saved += 1
        log.info(
            "saved %s (%d bytes) from %s to %s",
            path.name,
            len(content),
            envelope.mail_from,
            ", ".join(envelope.rcpt_tos),
        )
        return "250 Message accepted for delivery"


async def serve(
    directory: Path, port: int, host: str = HOST, tls: ssl.SSLContext | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; ``directory`` must exist. With ``tls``,
    STARTTLS is offered (not required)."""
    handler = SaveToDirectory(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            data_size_limit=MAX_MESSAGE,
            enable_SMTPUTF8=True,
            hostname="sink",
            tls_context=tls,
        ),
        host=host,
        port=port,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("mail sink listening on %s:%d, saving to %s", host, port, directory)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        log.info("mail sink stopped after %d message(s)", handler.saved)


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every SMTP command at INFO; one line per saved mail is enough.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        port = env_int(os.environ, "SMTP_PORT", DEFAULT_PORT, 1, 65535)
    except SettingsError as error:
        print(f"mail sink: {error}", file=sys.stderr)
        return 2
    directory = Path(os.environ.get("MAIL_SINK_DIR", "").strip() or DEFAULT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    cert = os.environ.get("MAIL_SINK_TLS_CERT", "").strip()
    key = os.environ.get("MAIL_SINK_TLS_KEY", "").strip()
    tls = None
    if cert or key:
        if not (cert and key):
            print("mail sink: set both MAIL_SINK_TLS_CERT and MAIL_SINK_TLS_KEY", file=sys.stderr)
            return 2
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
    asyncio.run(serve(directory, port, tls=tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
