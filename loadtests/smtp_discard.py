"""``python -m loadtests.smtp_discard PORT SUMMARY``: an SMTP server for benchmarks
that accepts every mail and keeps nothing but its Message-ID.

The mail bench (loadtests/bench_mail_lag.py) sends to it so that what is measured
is the mail worker, not the sink: one small asyncio protocol on uvloop, no
parsing beyond the command verb and the Message-ID header, nothing written to
disk. It offers PIPELINING, as production relays do, and answers EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP and QUIT on
127.0.0.1:PORT until SIGTERM or SIGINT, then writes SUMMARY (JSON): mails
accepted, distinct Message-IDs, the Message-IDs accepted more than once, and
the most sessions open at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter
from pathlib import Path

HOST = "127.0.0.1"
MAX_LINE = 4096
MAX_MESSAGE = 10 * 1024 * 1024
_MESSAGE_ID = b"\r\nmessage-id:"


class Tally:
    def __init__(self) -> None:
        self.ids: Counter[bytes] = Counter()
        self.mails = 0
        self.open = 0
        self.peak_open = 0

    def summary(self) -> dict:
        twice = {mid.decode(errors="replace"): n for mid, n in self.ids.items() if n > 1}
        return {
            "mails": self.mails,
            "distinct": len(self.ids),
            "duplicates": sum(n - 1 for n in twice.values()),
            "duplicate_ids": dict(list(twice.items())[:20]),
            "peak_open_sessions": self.peak_open,
        }


def message_id(data: bytes) -> bytes:
    head = b"\r\n" + data.split(b"\r\n\r\n", 1)[0]
    at = head.lower().find(_MESSAGE_ID)
    if at < 0:
        return b""
    end = head.find(b"\r\n", at + 2)
    return head[at + len(_MESSAGE_ID) : end if end >= 0 else None].strip()


class DiscardingSMTP(asyncio.Protocol):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.buffer = bytearray()
        self.in_data = False
        self.outgoing: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.tally.open += 1
        self.tally.peak_open = max(self.tally.peak_open, self.tally.open)
        self.transport.write(b"220 discard ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.tally.open -= 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        # The replies to everything in this read go out in one write, as a relay
        # offering PIPELINING does (RFC 2920: the server may buffer its replies).
        self.outgoing = []
        try:
            self._take()
        finally:
            if self.outgoing and self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(self.outgoing))

    def _take(self) -> None:
        while self.transport is not None and not self.transport.is_closing():
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_MESSAGE:
                        self.reply(b"552 too big")
                        self.transport.close()
                    return
                self.tally.ids[message_id(bytes(self.buffer[:end]))] += 1
                self.tally.mails += 1
                del self.buffer[: end + 5]
                self.in_data = False
                self.reply(b"250 accepted")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.transport.close()
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            self.command(line)

    def reply(self, line: bytes) -> None:
        self.outgoing.append(line + b"\r\n")

    def command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            # Commands are taken from the buffer one after the other, so a
            # pipelined group (RFC 2920) is answered in order, as a relay does.
            self.reply(b"250-discard\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760")
        elif verb == b"DATA":
            self.in_data = True
            self.reply(b"354 end with <CRLF>.<CRLF>")
        elif verb == b"QUIT":
            assert self.transport is not None
            self.transport.write(b"".join(self.outgoing) + b"221 bye\r\n")
            self.outgoing = []
            self.transport.close()
        elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            self.reply(b"250 OK")
        else:
            self.reply(b"502 not implemented")


async def serve(port: int) -> Tally:
    tally = Tally()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DiscardingSMTP(tally), HOST, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
    return tally


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    import uvloop

    tally = uvloop.run(serve(int(argv[0])))
    Path(argv[1]).write_text(json.dumps(tally.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
