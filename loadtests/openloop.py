"""An open-loop HTTP load generator: requests are due at fixed times, whatever the answers do.

    python -m loadtests.openloop SPEC.json RESULT.json

Why our own: Locust's constant-throughput users are closed loops (a user waits
for its answer before its next task) and one Locust process peaks at about
3.6k requests/s on a core, below 10x this shop's capacity; wrk's ``delay()``
pacing is also per connection and closed, and wrk reports one latency
histogram per run, from the moment a request was written, so it can neither
count latency from the time a request was due nor tell accepted latency from
refused latency, nor give a per-second timeline for the recovery. This one:

* computes every request's due time up front (``rate`` per second, evenly
  spaced) for each phase of the spec, and sends it then on an idle keep-alive
  connection, opening a new one when none is idle, up to
  ``max_connections``; past that the request waits here, its latency
  still counted from its due time;
* counts latency from the due time to the last byte of the answer (no
  coordinated omission);
* records, per request, its phase, when it was actually written, its status
  (0 when no answer: refused connection, reset, time-out) and its latency.

The spec (JSON) says where to send and what::

    {"host": "127.0.0.1", "port": 8080, "kind": "orders" | "get", "path": "/orders",
     "tokens": [...], "phones": [...], "nonce": "ab12", "timeout_s": 10,
     "max_connections": 2000, "phases": [{"name": "half", "rate": 200, "seconds": 10}, ...]}

The result (JSON) has one row per request: ``[phase index, due s, sent s,
status, latency ms, waited for a connection (0/1)]`` with times relative to
the start (sent 0: never sent). loadtests/rig.py turns
it into the per-phase and per-second figures. The process is meant to be
pinned to the generator's CPUs (loadtests/rig.py starts it so).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_ANSWER = 0


@dataclass
class Pending:
    phase: int
    due: float
    sent: float = 0.0
    queued: bool = False  # found no idle connection and waited for one (new or freed)


@dataclass
class Spec:
    host: str
    port: int
    kind: str
    path: str
    phases: list[dict[str, Any]]
    tokens: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    nonce: str = "x"
    timeout_s: float = 10.0
    # A request that got no connection within this long is given up (no answer),
    # as a client's connect time-out would: it must not hold up later phases.
    connect_timeout_s: float = 2.0
    max_connections: int = 2000
    # Connections opened before the first request is due.
    warm_connections: int = 0
    # Connects under way at once, at most: past it a request waits for one of them
    # (or a freed connection) rather than start a connect storm the kernel pays for
    # on the generator's CPU (loopback TCP runs in the sender's softirq).
    max_connecting: int = 64

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        return cls(**data)


class RequestMaker:
    """The bytes of request number ``n``: POST /orders with its own Idempotency-Key and a
    customer token and phone taken round robin, or a plain GET. Everything but the
    key's number is encoded once, up front: this runs 10k times a second."""

    def __init__(self, spec: Spec) -> None:
        if spec.kind not in ("orders", "get"):
            raise ValueError(f"unknown kind {spec.kind!r}")
        if spec.kind == "orders" and not (spec.tokens and spec.phones):
            raise ValueError("kind orders needs tokens and phones")
        self.kind = spec.kind
        host = f"Host: {spec.host}:{spec.port}\r\n".encode()
        self.get = f"GET {spec.path} HTTP/1.1\r\n".encode() + host + b"\r\n"
        self.heads = [
            (
                f"POST {spec.path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\n"
                f"Idempotency-Key: open-{spec.nonce}-"
            ).encode()
            for token in spec.tokens
        ]
        self.tails = []
        for phone in spec.phones:
            body = f'{{"items":[{{"phone_id":"{phone}","quantity":1}}]}}'.encode()
            self.tails.append(
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + host + b"\r\n" + body
            )

    def __call__(self, n: int) -> bytes:
        if self.kind == "get":
            return self.get
        head = self.heads[n % len(self.heads)]
        tail = self.tails[(n * 31) % len(self.tails)]
        return b"".join((head, str(n).encode(), tail))


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: Pending | None = None
        self.need: int | None = None  # bytes of the whole answer, once the head is read
        self.status = NO_ANSWER
        self.close_after = False
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, pending: Pending, data: bytes) -> None:
        assert self.transport is not None
        self.pending = pending
        pending.sent = self.generator.clock()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.pending is not None and self._answer_complete():
            pending, self.pending = self.pending, None
            self.generator.finished(self, pending, self.status)
            if self.close_after:
                self.abort()
                return

    def _answer_complete(self) -> bool:
        if self.need is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(self.buffer[:end]).lower()
            self.status = int(head[9:12])
            self.close_after = b"\r\nconnection: close" in head
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else None])
            self.chunked = b"\r\ntransfer-encoding: chunked" in head
            self.need = end + 4 + length
            if self.chunked:
                del self.buffer[: end + 4]
                self.need = None
                return self._chunked_complete()
        if self.chunked:
            return self._chunked_complete()
        if len(self.buffer) < self.need:
            return False
        del self.buffer[: self.need]
        self.need = None
        return True

    def _chunked_complete(self) -> bool:
        end = self.buffer.find(b"0\r\n\r\n")
        if end < 0:
            return False
        del self.buffer[: end + 5]
        self.chunked = False
        return True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.lost(self)


class Generator:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.make = RequestMaker(spec)
        self.loop = asyncio.get_running_loop()
        self.start = time.perf_counter()
        self.idle: collections.deque[Connection] = collections.deque()
        self.busy: set[Connection] = set()
        self.opening = 0
        self.waiting: collections.deque[tuple[Pending, int]] = collections.deque()
        self.rows: list[tuple[int, float, float, int, float, int]] = []
        # Requests that found all max_connections busy and had to wait for one to free.
        self.waited_for_connection = 0
        self.count = 0
        self.connect_errors = 0
        self.opened = 0

    def clock(self) -> float:
        # perf_counter, not loop.time(): uvloop's clock moves in whole milliseconds.
        return time.perf_counter() - self.start

    @property
    def connections(self) -> int:
        return len(self.idle) + len(self.busy) + self.opening

    # ---- sending --------------------------------------------------------------------

    def dispatch(self, pending: Pending) -> None:
        n = self.count
        self.count += 1
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                self.busy.add(conn)
                conn.send(pending, self.make(n))
                return
        pending.queued = True
        self.waiting.append((pending, n))
        if self.connections >= self.spec.max_connections:
            self.waited_for_connection += 1
        elif self.opening < self.spec.max_connecting:
            self.opening += 1
            self.loop.create_task(self.open())

    async def open(self) -> None:
        try:
            _, conn = await self.loop.create_connection(
                lambda: Connection(self), self.spec.host, self.spec.port
            )
        except OSError:
            self.opening -= 1
            self.connect_errors += 1
            if self.waiting:  # the oldest waiting request gets no answer
                pending, _ = self.waiting.popleft()
                self.record(pending, NO_ANSWER)
            return
        self.opening -= 1
        self.opened += 1
        self.ready(conn)
        self.more_connections()

    def ready(self, conn: Connection) -> None:
        if self.waiting:
            pending, n = self.waiting.popleft()
            self.busy.add(conn)
            conn.send(pending, self.make(n))
        else:
            self.idle.append(conn)

    # ---- answers ----------------------------------------------------------------------

    def record(self, pending: Pending, status: int) -> None:
        latency_ms = (self.clock() - pending.due) * 1000
        self.rows.append(
            (pending.phase, pending.due, pending.sent, status, latency_ms, int(pending.queued))
        )

    def finished(self, conn: Connection, pending: Pending, status: int) -> None:
        self.record(pending, status)
        self.busy.discard(conn)
        if not conn.close_after:
            self.ready(conn)

    def lost(self, conn: Connection) -> None:
        self.busy.discard(conn)
        with_request = conn.pending
        conn.pending = None
        conn.transport = None
        if with_request is not None:
            self.record(with_request, NO_ANSWER)
        self.more_connections()

    def more_connections(self) -> None:
        """Start one more connect while requests wait and the caps allow it."""
        if (
            self.waiting
            and self.connections < self.spec.max_connections
            and self.opening < self.spec.max_connecting
        ):
            self.opening += 1
            self.loop.create_task(self.open())

    def expire(self) -> None:
        """Give up on requests older than the time-out: no answer, connection dropped."""
        now = self.clock()
        limit = now - self.spec.timeout_s
        for conn in [c for c in self.busy if c.pending is not None and c.pending.due < limit]:
            conn.abort()
        connect_limit = now - self.spec.connect_timeout_s
        while self.waiting and self.waiting[0][0].due < connect_limit:
            pending, _ = self.waiting.popleft()
            self.record(pending, NO_ANSWER)

    # ---- the schedule ----------------------------------------------------------------

    async def warm(self) -> None:
        """Open ``warm_connections`` before the clock starts, 64 at a time."""
        left = min(self.spec.warm_connections, self.spec.max_connections)
        while left > 0:
            batch = min(64, left)
            self.opening += batch
            await asyncio.gather(*(self.open() for _ in range(batch)))
            left -= batch

    async def run(self) -> dict[str, Any]:
        await self.warm()
        self.start = time.perf_counter()
        # The same instant on the wall clock, for figures taken by other processes.
        epoch = time.time()
        phase_starts = []
        begin = 0.2  # a moment to settle before the first due time
        for index, phase in enumerate(self.spec.phases):
            phase_starts.append(begin)
            interval = 1.0 / phase["rate"]
            total = round(phase["rate"] * phase["seconds"])
            next_expiry = 0.0
            for i in range(total):
                due = begin + i * interval
                wait = due - self.clock()
                if wait > 0.0005:
                    await asyncio.sleep(wait)  # the open-loop schedule: pacing
                elif i % 32 == 0:
                    await asyncio.sleep(0)  # behind schedule: still read answers now and then
                self.dispatch(Pending(index, due))
                if due >= next_expiry:
                    self.expire()
                    next_expiry = due + 0.1
            begin += phase["seconds"]
        # The last answers, or their time-out.
        while (self.busy or self.waiting or self.opening) and self.clock() < begin + (
            self.spec.timeout_s + 1
        ):
            self.expire()
            await asyncio.sleep(0.05)  # polling for the last answers, bounded above
        for conn in list(self.idle) + list(self.busy):
            conn.abort()
        return {
            "phase_starts": phase_starts,
            "epoch": epoch,
            "end": begin,
            "connect_errors": self.connect_errors,
            "connections_opened": self.opened,
            "waited_for_connection": self.waited_for_connection,
            "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
            "rows": self.rows,
        }


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def generate(spec: Spec) -> dict[str, Any]:
    return await Generator(spec).run()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = Spec.from_json(json.loads(Path(args[0]).read_text()))
    raise_open_files_limit()
    # The rows pile up to a few hundred thousand tuples: the cyclic collector's full
    # passes over them would stall the schedule for tens of milliseconds each. A
    # bounded run leaks nothing that matters without it.
    gc.disable()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency of the app
        runner = asyncio.run
    began = time.monotonic()
    result = runner(generate(spec))
    result["wall_s"] = time.monotonic() - began
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
