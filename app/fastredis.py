"""A lean, multiplexed Redis connection for the hot path (the order scripts).

redis-py's asyncio client costs about 145 us of CPU per call (pool checkout,
retry wrapper, per-call timeouts, one socket and two syscalls per command);
a bare hiredis protocol costs a fraction of it. This connection sends every
command of one event-loop iteration in a single write, and hands replies back
in order (Redis answers a connection's commands in the order they arrived), so
concurrent requests share syscalls instead of each holding a pooled socket.

Semantics kept from the redis-py client it sits beside (app/main.py):

* errors are redis-py's own exception classes (its parser maps the replies), so
  the error middleware answers exactly as before: connection errors and
  timeouts become 503 + Retry-After, BUSY/LOADING/READONLY 503, others 500;
* ``REDIS_TIMEOUT`` bounds connecting and every reply; a command whose reply
  is late raises TimeoutError, and its reply is dropped when it arrives;
* a connection that owes the reply of a command that already timed out, when
  another command times out behind it, has answered nothing for a whole
  time-out: it is aborted (its other commands fail with ConnectionError) and
  the next command reconnects. Otherwise a path that died without a reset
  would hold every command hostage until the kernel gave up (about 15 min);
* no silent retries: a command in flight when the connection drops fails with
  ConnectionError (a script may or may not have run; clients retry with their
  Idempotency-Key). The next command opens a new connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import hiredis
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.asyncio.connection import Connection, ConnectionPool, UnixDomainSocketConnection

log = logging.getLogger(__name__)

_parse_error = BaseParser.parse_error  # a classmethod: the same classes redis-py raises


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, packed: bytes, waiter: asyncio.Future[Any]) -> None:
        """Queue one command; everything queued in this loop iteration goes in one write."""
        self._outgoing.append(packed)
        self.waiters.append(waiter)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            waiter.get_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing and self.transport is not None and self.lost is None:
            data = b"".join(self._outgoing)
            self._outgoing.clear()
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except hiredis.ProtocolError as error:
            if self.transport is not None:
                self.transport.abort()
            self._fail(redis.exceptions.ConnectionError(f"Protocol error: {error}"))

    def expire(self, *timed_out: asyncio.Future[Any]) -> None:
        """The time-out of these commands fired: fail them, and drop the connection
        when an older command that already timed out is still owed its reply."""
        for waiter in timed_out:
            if not waiter.done():
                waiter.set_exception(redis.exceptions.TimeoutError("Timeout reading from server"))
        oldest = self.waiters[0] if self.waiters else None
        if oldest is None or not oldest.done() or oldest in timed_out or self.lost is not None:
            return
        # Nothing came back for a whole time-out while replies are owed: the
        # server or the path to it is stuck, and every command queued behind
        # would time out too. Start over on a new connection.
        log.warning("redis: nothing answered for a whole time-out; reconnecting")
        if self.transport is not None:
            self.transport.abort()
        self._fail(redis.exceptions.ConnectionError("Connection dropped after time-outs"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis.exceptions.ConnectionError("Connection closed by server."))

    def _fail(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = error
        self._outgoing.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


class MultiplexedRedis:
    """One pipelined connection shared by every coroutine of a worker."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._address = (host, port, path)
        self._db = db
        self._auth = (username, password)
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def for_pool(cls, pool: ConnectionPool, timeout: float) -> MultiplexedRedis | None:
        """Same server, database and credentials as a redis-py pool's connections;
        None for TLS (rediss://), which this client does not speak."""
        if pool.connection_class not in (Connection, UnixDomainSocketConnection):
            return None
        kwargs = pool.connection_kwargs
        return cls(
            host=kwargs.get("host") or "127.0.0.1",
            port=int(kwargs.get("port") or 6379),
            path=kwargs.get("path"),
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            timeout=timeout,
        )

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        host, port, path = self._address
        try:
            async with asyncio.timeout(self._timeout):
                if path:
                    _, protocol = await loop.create_unix_connection(_Protocol, path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, host, port)
        except TimeoutError:
            raise redis.exceptions.TimeoutError("Timeout connecting to server") from None
        except OSError as error:
            raise redis.exceptions.ConnectionError(
                f"Error connecting to {path or f'{host}:{port}'}: {error}"
            ) from None
        username, password = self._auth
        try:
            if password:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                await self._roundtrip(protocol, auth)
            if self._db:
                await self._roundtrip(protocol, ("SELECT", self._db))
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.close()
            raise
        return protocol

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                protocol = self._protocol = await self._connect()
        return protocol

    @property
    def connection(self) -> object | None:
        """The connection in use, as an opaque token (None when there is none):
        a different token means it was dropped and made again since."""
        protocol = self._protocol
        return protocol if protocol is not None and protocol.lost is None else None

    async def _roundtrip(self, protocol: _Protocol, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        protocol.send(hiredis.pack_command(args), waiter)
        # One timer per command (cheaper than asyncio.timeout's context manager);
        # a reply arriving after it fired finds the waiter done and is dropped.
        timer = loop.call_later(self._timeout, protocol.expire, waiter)
        try:
            reply = await waiter
        finally:
            timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise _parse_error(str(reply))
        return reply

    async def execute(self, *args: Any) -> Any:
        """Run one command; redis-py's exceptions on errors, the raw reply otherwise."""
        return await self._roundtrip(await self._ready(), args)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one write (a pipeline without MULTI): their replies, in
        order; the first error reply is raised, as redis-py's pipeline does."""
        protocol = await self._ready()
        loop = asyncio.get_running_loop()
        waiters: list[asyncio.Future[Any]] = []
        for args in commands:
            waiter: asyncio.Future[Any] = loop.create_future()
            protocol.send(hiredis.pack_command(args), waiter)
            waiters.append(waiter)
        timer = loop.call_later(self._timeout, protocol.expire, *waiters)
        try:
            replies = [await waiter for waiter in waiters]
        except BaseException:
            for waiter in waiters:  # retrieve the rest: no "exception never retrieved"
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()
                else:
                    waiter.cancel()
            raise
        finally:
            timer.cancel()
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise _parse_error(str(reply))
        return replies

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            protocol._fail(redis.exceptions.ConnectionError("Connection closed by the client."))
