"""The mail worker's Redis work for a chunk of mails, a few round trips for many.

A lane (mail/worker.py) sends a chunk of mails, of one or several partitions'
streams ``e{P}``; every script and MULTI below touches one partition (one slot).
Per chunk, not per mail:

1. ``prefetch``: the sent marker ``ms{P}`` and the order hash of every mail;
2. ``load_and_hold``: the customers and phone names, and ``hold_entries.lua``
   once per partition of the chunk (every entry still ours, its idle time
   reset, its attempt counted);
3. ``ack_sent``: one MULTI per partition with the sent markers (SET NX), the
   attempt counters deleted, one XACK and one ZREM (the worker sends it for
   each accepted mail, and once per partition for the redeliveries of a chunk).

These go over one multiplexed connection (app/fastredis.py: hiredis, every
command of an event-loop turn in one write), not redis-py's client, which costs
about 145 us of CPU per call: that and one AOF write per mail were a third of
the worker's CPU. For rediss:// (TLS), which that connection does not speak,
and a cluster client, the worker's redis-py client carries the same commands.
Replies are raw bytes, or what redis-py makes of them; ``text`` and ``_pairs``
read both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from app import keys
from app.fastredis import MultiplexedRedis
from app.partitions import PARTITIONS
from app.redis_clients import raise_as_lost
from mail import scripts

_parse_error = BaseParser.parse_error  # redis-py's exception class for an error reply
GROUP = keys.MAIL_GROUP


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: Any) -> dict[str, str]:
    """HGETALL's raw reply: RESP2's flat list or RESP3's map."""
    if isinstance(reply, dict):
        return {text(k): text(v) for k, v in reply.items()}
    return {text(reply[i]): text(reply[i + 1]) for i in range(0, len(reply), 2)}


def _text_pairs(flat: list[bytes]) -> dict[str, str]:
    """A raw flat field list (RESP2, as hiredis gives it) as text."""
    return dict(zip(map(bytes.decode, flat[::2]), map(bytes.decode, flat[1::2]), strict=True))


class _FastTransport:
    def __init__(self, fast: MultiplexedRedis) -> None:
        self._fast = fast

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        return await self._fast.execute_many(commands)

    async def transaction(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        replies = await self._fast.execute_many([("MULTI",), *commands, ("EXEC",)])
        for reply in replies[-1] or ():
            if isinstance(reply, Exception):
                raise _parse_error(str(reply))
        return replies[-1]

    async def aclose(self) -> None:
        await self._fast.aclose()


@contextlib.contextmanager
def _closed_transport_is_a_lost_connection() -> Iterator[None]:
    """A connection closed under the call by the cluster client (app/redis_clients.py:
    raise_as_lost) is a lost connection, which the worker handles (the lane retries, the
    loop backs off), instead of a bug."""
    try:
        yield
    except (RuntimeError, AttributeError) as error:
        raise_as_lost(error)


class _ClientTransport:
    """The worker's redis-py client itself (rediss://, or a cluster client, which
    has no one connection pool). Its reply parsing stays on: every reply read
    here comes as the multiplexed connection's or as a type ``text`` and
    ``_pairs`` read too (an int, a str, a dict)."""

    def __init__(self, redis: Any) -> None:
        self._client = redis

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        with _closed_transport_is_a_lost_connection():
            async with self._client.pipeline(transaction=False) as pipe:
                for args in commands:
                    pipe.execute_command(*args)
                return await pipe.execute()

    async def transaction(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        with _closed_transport_is_a_lost_connection():
            async with self._client.pipeline(transaction=True) as pipe:
                for args in commands:
                    pipe.execute_command(*args)
                return await pipe.execute()

    async def aclose(self) -> None:
        return None  # the worker closes its own client


@dataclass(frozen=True, slots=True)
class Loaded:
    """One mail's data as Redis holds it, and hold_entries' answer."""

    customer: tuple[str | None, str | None, str | None, str | None]  # name, surname, email, balance
    phone_names: list[str | None]
    attempts: int  # 0: the entry is no longer ours


class BatchRedis:
    def __init__(self, redis: Redis, consumer: str, attempts_ttl: int, timeout: float) -> None:
        pool = getattr(redis, "connection_pool", None)
        fast = MultiplexedRedis.for_pool(pool, timeout) if pool is not None else None
        self._transport: _FastTransport | _ClientTransport = (
            _FastTransport(fast) if fast is not None else _ClientTransport(redis)
        )
        # The blocking read of new entries gets a connection of its own: a command
        # behind it would wait as long as it blocks.
        self._reader = MultiplexedRedis.for_pool(pool, timeout) if fast is not None else None
        streams = [keys.events(p) for p in range(PARTITIONS)]
        self._read_tail = ("STREAMS", *streams, *(">" for _ in streams))
        self._partition_of = {stream.encode(): p for p, stream in enumerate(streams)}
        self._redis = redis
        self._consumer = consumer
        self._ttl = attempts_ttl
        self._hold_source = scripts.source("hold_entries")
        self._hold_sha = hashlib.sha1(self._hold_source.encode()).hexdigest()

    async def aclose(self) -> None:
        await self._transport.aclose()
        if self._reader is not None:
            await self._reader.aclose()

    @property
    def reads_fast(self) -> bool:
        """``read_new`` works here (one redis-server, not over TLS)."""
        return self._reader is not None

    async def read_new(
        self, count: int, block: int | None
    ) -> list[tuple[int, list[tuple[str, dict[str, str]]]]]:
        """XREADGROUP ``>`` over every partition's stream, COUNT ``count`` each, blocking
        up to ``block`` ms (None: not at all), as (partition, [(entry id, fields)]).
        Packed and parsed by hiredis: redis-py's encoder and reply parser cost
        about a third of a millisecond for this command of 261 arguments."""
        assert self._reader is not None
        head: tuple[Any, ...] = ("XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", count)
        if block is not None:
            head += ("BLOCK", block)
        reply = await self._reader.execute(*head, *self._read_tail)
        found = []
        for stream, entries in reply or ():
            items = [
                (entry_id.decode(), {} if flat is None else _text_pairs(flat))
                for entry_id, flat in entries
            ]
            found.append((self._partition_of[stream], items))
        return found

    async def prefetch(self, order_ids: list[str]) -> tuple[list[bool], list[dict[str, str]]]:
        """Per order: its confirmation was already sent; its hash ({} when missing)."""
        commands: list[tuple[Any, ...]] = [("EXISTS", keys.mail_sent(o)) for o in order_ids]
        commands += [("HGETALL", keys.order(o)) for o in order_ids]
        replies = await self._transport.execute_many(commands)
        n = len(order_ids)
        return [bool(r) for r in replies[:n]], [_pairs(r) for r in replies[n:]]

    async def script_each(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """mail/lua/<name>.lua once per (keys, args), every call in one round (a
        partition's keys each: a cluster client splits them per node)."""
        source = scripts.source(name)
        sha = hashlib.sha1(source.encode()).hexdigest()
        commands = [("EVALSHA", sha, len(ks), *ks, *args) for ks, args in calls]
        try:
            return await self._transport.execute_many(commands)
        except NoScriptError:  # a restarted Redis; on a cluster, every primary loads it
            await self._redis.script_load(source)
            return await self._transport.execute_many(commands)

    async def first_retries(self) -> dict[int, float]:
        """Per partition with a mail waiting for its retry: when the first is due (ms)."""
        replies = await self._transport.execute_many(
            [("ZRANGE", keys.mail_retry(p), 0, 0, "WITHSCORES") for p in range(PARTITIONS)]
        )
        return {p: float(text(reply[1])) for p, reply in enumerate(replies) if reply}

    async def load_and_hold(
        self, mails: list[tuple[int, str, str, str, list[str]]]
    ) -> list[Loaded]:
        """``mails``: (partition, entry id, order id, customer id, phone ids) each, of
        any partitions. Their customers and phone names, and, in the same round
        trip, the hold (one hold_entries.lua per partition: one slot each)."""
        commands: list[tuple[Any, ...]] = []
        holds: dict[int, list[tuple[str, str]]] = {}
        for partition, entry_id, order_id, customer_id, phone_ids in mails:
            commands.append(
                ("HMGET", keys.customer(customer_id), "name", "surname", "email", "balance_cents")
            )
            commands += [("HGET", keys.phone(p), "name") for p in phone_ids]
            holds.setdefault(partition, []).append((entry_id, order_id))
        replies = await self._with_holds(commands, holds, count=True)
        held = self._held(replies[len(commands) :], holds)
        out = []
        at = 0
        for partition, entry_id, _, _, phone_ids in mails:
            customer = tuple(None if v is None else text(v) for v in replies[at])
            names = [
                None if v is None else text(v) for v in replies[at + 1 : at + 1 + len(phone_ids)]
            ]
            at += 1 + len(phone_ids)
            out.append(Loaded(customer, names, held[partition, entry_id]))  # type: ignore[arg-type]
        return out

    async def hold(self, entries: list[tuple[int, str, str]]) -> list[int]:
        """Renew the hold of (partition, entry id, order id) held earlier and not sent
        yet, without counting another attempt. Per entry: its attempt, 0 when lost."""
        holds: dict[int, list[tuple[str, str]]] = {}
        for partition, entry_id, order_id in entries:
            holds.setdefault(partition, []).append((entry_id, order_id))
        held = self._held(await self._with_holds([], holds, count=False), holds)
        return [held[partition, entry_id] for partition, entry_id, _ in entries]

    @staticmethod
    def _held(
        replies: list[Any], holds: dict[int, list[tuple[str, str]]]
    ) -> dict[tuple[int, str], int]:
        """hold_entries' answers (one list per partition, in ``holds``' order) by entry."""
        return {
            (partition, entry_id): int(n)
            for (partition, entries), answer in zip(holds.items(), replies, strict=True)
            for (entry_id, _), n in zip(entries, answer, strict=True)
        }

    async def _with_holds(
        self,
        commands: list[tuple[Any, ...]],
        holds: dict[int, list[tuple[str, str]]],
        *,
        count: bool,
    ) -> list[Any]:
        """``commands``, then hold_entries.lua on each partition's (entry id, order id)
        pairs (of that partition's stream), all in one round trip."""
        calls = []
        for partition, entries in holds.items():
            hold_keys = [keys.events(partition)]
            hold_keys += [keys.mail_attempts(order_id) for _, order_id in entries]
            hold_args = [GROUP, self._consumer, self._ttl, 1 if count else 0]
            hold_args += [entry_id for entry_id, _ in entries]
            calls.append((len(hold_keys), *hold_keys, *hold_args))
        try:
            return await self._transport.execute_many(
                [*commands, *(("EVALSHA", self._hold_sha, *call) for call in calls)]
            )
        except NoScriptError:  # a restarted Redis: EVAL loads it (the reads before only read)
            return await self._transport.execute_many(
                [*commands, *(("EVAL", self._hold_source, *call) for call in calls)]
            )

    async def ack(self, entries: dict[int, list[str]]) -> None:
        """XACK entries that need no mail, per partition's stream, in one round trip."""
        await self._transport.execute_many(
            [("XACK", keys.events(p), GROUP, *ids) for p, ids in entries.items()]
        )

    async def ack_sent(self, partition: int, sent: list[tuple[str, str, str | None, int]]) -> None:
        """One MULTI for the chunk (of one partition: one slot): per (entry id, order id, Message-ID or None for a
        mail found already sent, when the server accepted it in ms), the sent marker
        SET NX, and for all of them the attempt counters deleted, XACK and ZREM from
        the retry queue."""
        if not sent:
            return
        commands: list[tuple[Any, ...]] = []
        for _, order_id, mid, at_ms in sent:
            if mid is not None:
                marker = json.dumps({"message_id": mid, "at": at_ms})
                commands.append(("SET", keys.mail_sent(order_id), marker, "NX"))
        entry_ids = [entry_id for entry_id, _, _, _ in sent]
        commands.append(("DEL", *(keys.mail_attempts(o) for _, o, _, _ in sent)))
        commands.append(("XACK", keys.events(partition), GROUP, *entry_ids))
        commands.append(("ZREM", keys.mail_retry(partition), *entry_ids))
        await self._transport.transaction(commands)
