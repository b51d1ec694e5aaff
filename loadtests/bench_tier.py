"""make bench's data-tier section (issue 11): the app's order path on 1 and on 3 primaries
in one run. ``python -m loadtests.bench_tier [--orders N] [--inflight K]
[--tier-workloads uniform,hot,zipf]`` runs it alone.

**Workloads** (:data:`WORKLOADS`, docs/escrow.md section 9), each measured as below on the
same two clusters and reported side by side: ``uniform``, 2,000 orders over 1,024 phones
(every phone alike, as this section always measured); ``hot``, 60,000 orders over 64
phones; ``zipf``, 60,000 orders over 1,024 phones of Zipf(1) popularity. Stock 10^9 and
1,024 customers in each, 8 in every partition (:func:`customer_emails`). Where the app has
escrow's switch (:func:`escrow_options`), every recording runs with it on, as the app does
by default (on uniform, about two orders per phone, it seldom stripes one); without the
switch they measure the saga alone.

Per shard count a local cluster of its own, both up at once (no replicas, AOF
``appendfsync always``, on free ports in a temp folder, stopped afterwards):

1. **Record** (per workload, in a fresh Python process: a freshly started worker, with
   none of the app's in-process beliefs of an earlier recording). Phones and customers are
   created, then one-line orders placed, by the app's own service functions over the app's
   cluster gateway (:func:`order_path`: what app/orders/handlers.py runs for POST /orders on
   a cluster), ``--inflight`` at a time, with the app's settler; then the recording waits
   until nothing the service started is left to run (:func:`quiet`: the settler's batches,
   any task or timer it left behind off the request path). Every command the gateway sends
   is recorded as it is answered (:class:`Recording`, below redis-py's cluster client's
   ``execute_command`` and the gateway's pipelines: scripts with their KEYS and ARGV, and
   plain commands), so a new kind of call is measured and counted by its name without a
   change here; then put in the order each node ran them (its slow log, which logs every
   command while the orders run: two calls sent at once on two connections may be
   answered in the other order). Phones land in random partitions, as the app mints them;
   customers in their e-mail's partition, with e-mails chosen so that every partition holds
   as many (:func:`customer_emails`), so orders spread over the partitions as a shop's do.
2. **Replay, saturated** (``--replays`` times, ``--tier-hot-replays`` for the hot ones;
   per primary the median). Every primary is flushed, the creations are replayed (not
   measured), its AOF rewritten and its automatic rewrite turned off (:func:`aof_rebased`:
   no fork inside the window), then each primary's own share of everything the orders
   sent is sent to it alone, pipelined as fast as it takes them (``redis-cli --pipe``,
   streams split by slot so that each partition's calls keep their order): the primary
   on the stack CPU, the pipes on the load CPUs. Every primary of both shard counts gets
   as many pipes (:func:`alike_pipes`, at most ``--connections``). The two clusters are
   replayed together (:func:`replayed_together`): each primary's calls in up to
   ``REPLAY_PARTS`` slices, slice k of every primary of one cluster, then of the other,
   then slice k+1 in the other order, so that the shared box's slow and fast seconds
   fall on both alike; (a) is also kept per paired replay, and its spread reported. The
   primary's stream depends on nothing another primary does (a script touches one node's
   keys), so replaying each in turn is the run the app made. Afterwards every primary must hold exactly the keys it
   held after the recording, and (after a recording's first replay) the conservation audit
   (app/admin/audit.py) must hold at rest with exactly the orders the app placed.
   Figures before fd75c92 are not comparable: its replay chose a stream by slot mod
   ``--connections``, and every partition's slot is a multiple of 128, so each primary got
   one pipe, not 8. With 8 the 1-primary replay costs less per order and the 3-primary one
   about the same: (a) rose from 1.28 to 1.43 and the measured ceiling fell from 1.69 to
   1.42 (one recording of uniform, both replays alternating five times, 2026-12-03). On
   this shared box (a) spreads by about ±0.2 from run to run. Redis's instruction counts
   (valgrind callgrind, the same recording replayed with each tree's scripts) say the
   escrow steps' scripts cost 1.6% more per order on both shard counts: (a) 1.338 at
   acda98f, 1.339 at 3f0abe5. Figures of hot and zipf before ecaf1ad are not comparable
   either: their stripe orders left each primary of 3 one pipe against 8 for 1 primary
   (:func:`alike_pipes`), and AOF rewrites forked inside the window (docs/escrow.md,
   section 9).
3. **As at the ceiling** (:func:`as_at_the_ceiling`). The order path counts orders per
   unit of time in several windows: the settler gathers 50 ms of settles into one call
   per phone partition, escrow stripes a phone after 4 apart reserves in a 10 s horizon
   and sizes a grant by the orders of the last horizon. At the recording's pace (about a
   tenth of the tier's ceiling) each window holds a tenth of the orders it would hold at
   the ceiling. The orders are recorded again on both shard counts with every such window
   stretched by the derived ceiling over the recording's pace, and, with escrow, after a
   warm-up of as many orders, replayed unmeasured with the creations (a tier at its
   ceiling has been selling: its phones' first sales, which go by the saga until a phone
   is striped, are behind it); then replayed alternating: a second set of figures, a
   model of the app at its ceiling, said to be one.
4. **End to end.** The stack of make bench (nginx, 2 instances x 1 worker) on that
   cluster: wrk ``POST /orders`` through nginx (shown beside the uniform workload).

Figures: Redis CPU per order (``used_cpu_sys + used_cpu_user`` deltas of every primary
over its replay, summed); each primary's replay time, from which the tier's **measured**
ceiling is the slowest primary's orders/s (what the tier sustains when each primary has a
core of its own and the others keep up); the **derived** ceiling, orders over the busiest
primary's CPU seconds (a core per shard, CPU-bound); the share of its core each primary
got while saturated (CPU / wall) and how busy that core was whoever ran (idle time: fsync
waits or the pipes, not the CPU, set the pace). On a 2-core machine three primaries cannot run saturated at once beside their
driver: that would measure the machine, so they are measured in turn.

Traffic goes only to 127.0.0.1, to servers this module starts and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import os
import pickle
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.connection import Encoder, PythonRespSerializer
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from app import appkeys, keys
from app.cluster_gateway import ClusterGateway, open_cluster_gateway
from app.customers.models import CustomerCreate
from app.customers.service import create_customer
from app.ops.instances import ROOT
from app.ops.poll import wait_until
from app.ops.redis_cluster import LocalCluster, client
from app.orders import grants, saga_service
from app.orders.chunk_hints import HINTS
from app.orders.settler import SETTLE_DELAY_S, Settler
from app.orders.stripes import DRY_S, STRIPE_HINTS
from app.partitions import PARTITIONS, partition_for_email
from app.phones.models import PhoneCreate
from app.phones.service import create_phone
from app.redis_gateway import LuaScript
from app.scripts import Scripts
from app.settings import Settings
from app.vocabulary import COMPLETED
from loadtests import rig
from loadtests.bench_data import provision
from loadtests.bench_drivers import orders_wrk, write_wrk_data
from loadtests.datatier import cpu_seconds
from loadtests.stack import launch
from loadtests.support.cluster_audit import audit

TITLE = "The data tier: 1 primary against 3 (issue 11)"
# Issue 11's targets for 3 primaries against 1.
CPU_PER_ORDER_MAX = 1.3
CEILING_MIN = 2.5
# A catalogue and a clientele large enough that the app's random placement splits them
# evenly over 3 primaries (with 64 phones one primary held up to a third more of them).
PHONES = 1024
CUSTOMERS = 1024
# Orders of the workloads on which escrow's stripes are reused (hot, zipf). Their warm-up
# (each phone's first 16 apart orders by the saga, then grants of 8, 16, 32... units) is
# inside the measured window at any length; at 20,000 orders it was 0.22 script calls per
# order of the 1.22 on 3 primaries, at 60,000 0.08 of 1.08 (one run each, 2026-12-03):
# a shop's hot phones take their thousands of orders between restocks, not 300.
HOT_ORDERS = 60_000
# Every phone's stock and every customer's balance: no order is ever refused for them.
STOCK = 10**9
BALANCE_CENTS = 10**12
# Creations in flight at once (they are not measured).
CREATING = 32
# Long enough that no reservation of the recording falls due before its replay.
RESERVATION_TTL_MS = 600_000
# Recordings of one workload and shard count made at most (alternated).
RECORD_ATTEMPTS = 4
# How long the recording waits, after the last order's answer, for what the service does
# off the request path (settles, and whatever else it queued) to be done.
QUIET_DEADLINE_S = 60.0
# Slices of a replay, taken in turn with the other shard count's (replayed_together), and
# the fewest calls a primary's slice holds: each slice starts its pipes afresh, and in a
# few hundred calls their start would be the wall time (uniform's 2,000 orders: 1 slice).
REPLAY_PARTS = 8
SLICE_CALLS_MIN = 2_000
# How long the replay waits for the AOF rewrites it asks for before its measured window.
AOF_REWRITE_DEADLINE_S = 60.0
# How long redis-cli --pipe may take to start and connect.
PIPES_CONNECT_DEADLINE_S = 10.0
_ENCODE = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode).pack


def customer_emails(count: int) -> list[str]:
    """``count`` e-mails whose customers fill every partition alike (no two partitions
    more than one apart), among the first ``tier-<n>@example.com``.

    A customer lives in its e-mail's partition (app/partitions.py). A shop's many
    customers spread over the partitions by that hash almost exactly; 1,024 taken as they
    come did not: 8 on average, from 2 to 14 per partition, 34.7% of them on one primary of
    3, which then ran 34.7% of the orders and capped the derived ceiling (b) at 1 / (0.347
    x (a)) instead of 1 / (0.336 x (a)), the 43 partitions of 128 a primary serves."""
    depth = -(-count // PARTITIONS)
    found = [0] * PARTITIONS  # e-mails found per partition, up to ``depth``
    # levels[k]: the e-mails that are their partition's (k+1)-th, in the order found (as
    # random as the hash): a partition's (k+1)-th is taken only once each has k.
    levels: list[list[str]] = [[] for _ in range(depth)]
    for n in itertools.count():
        if len(levels[-1]) == PARTITIONS:
            break
        email = f"tier-{n}@example.com"
        partition = partition_for_email(email)
        if found[partition] < depth:
            levels[found[partition]].append(email)
            found[partition] += 1
    return [email for level in levels for email in level][:count]


@dataclass(frozen=True, slots=True)
class Workload:
    """Which orders are placed: ``orders`` one-line orders of one unit, over ``phones``
    phones and ``customers`` customers. ``popularity``: ``stride`` (order n: customer
    n mod customers, phone 7n mod phones: every phone alike, the first workload of this
    section), ``uniform`` (each order's phone and customer drawn uniformly) or ``zipf``
    (the phone of rank i drawn with weight 1/i: Zipf(1); the customer uniformly). Draws
    come from a generator seeded with ``seed``: the same orders in every run and on both
    shard counts. Which partitions the phones land in is the app's own (ids minted at
    random): not seeded; customers by their e-mails (:func:`customer_emails`).
    ``warm_up``: orders of the same draw placed first, whose calls are replayed unmeasured
    with the creations (a shop that has been selling: its stripes in place)."""

    name: str
    phones: int
    orders: int
    customers: int = CUSTOMERS
    popularity: str = "stride"
    seed: int = 11
    # Escrow switched on for its recordings where the app has it (escrow_on).
    escrow: bool = False
    warm_up: int = 0

    def picks(self) -> list[tuple[int, int]]:
        """Per order, in order, the warm-up's first: (customer index, phone index)."""
        count = self.warm_up + self.orders
        if self.popularity == "stride":
            return [(n % self.customers, (n * 7) % self.phones) for n in range(count)]
        draw = random.Random(self.seed)
        customers = [draw.randrange(self.customers) for _ in range(count)]
        if self.popularity == "uniform":
            phones = [draw.randrange(self.phones) for _ in range(count)]
        elif self.popularity == "zipf":
            weights = [1 / rank for rank in range(1, self.phones + 1)]
            phones = draw.choices(range(self.phones), weights=weights, k=count)
        else:
            raise ValueError(f"popularity {self.popularity!r}: stride, uniform or zipf")
        return list(zip(customers, phones, strict=True))

    def describe(self) -> str:
        how = {
            "stride": "every phone alike (order n: phone 7n mod phones)",
            "uniform": "each order's phone drawn uniformly",
            "zipf": "phone of rank i drawn with weight 1/i (Zipf(1))",
        }[self.popularity]
        warm = f" after {self.warm_up:,} warm-up orders" if self.warm_up else ""
        return (
            f"{self.orders:,} orders{warm}, {self.phones:,} phones, {self.customers:,} "
            f"customers: {how}; {self.orders / self.phones:,.1f} orders per phone"
        )


# docs/escrow.md section 9: the uniform workload as it always was, and the two on which
# quotas of a phone can be reused (many orders per phone between restocks). Escrow on in
# each, as the app runs by default (ESCROW_STRIPES).
WORKLOADS = {
    "uniform": Workload("uniform", PHONES, 2000, escrow=True),
    "hot": Workload("hot", 64, HOT_ORDERS, popularity="uniform", escrow=True),
    "zipf": Workload("zipf", PHONES, HOT_ORDERS, popularity="zipf", escrow=True),
}
# What the rows "as at the 3-primary ceiling" are (as_at_the_ceiling).
AT_THE_CEILING = "the order path's windows stretched to its pace, escrow's after a warm-up"
# Replays of each of them (uniform: --replays): as many, each 30 times as long. Medians
# of 2 gave hot's (a) 1.09 and 1.27 in one run, for two recordings that differ only in
# the settler's window (2026-12-03).
HOT_REPLAYS = 5


@dataclass(frozen=True, slots=True)
class Call:
    """One command as the app sent it: a script (``sha`` its SHA1, ``script`` its name)
    with its KEYS and ARGV, or a plain command (``sha`` empty, ``script`` the command's
    name, ``keys`` its first argument, ``args`` the rest). ``across``: the keys of other
    slots that a script's form for several slots of one node (app/lua_prelude.py:
    across_slots) is given in its ARGV, undeclared."""

    script: str
    sha: str
    keys: tuple[str | bytes, ...]
    args: tuple[str | bytes, ...]
    across: tuple[str | bytes, ...] = ()

    @property
    def slot(self) -> int:
        """Every key of one call is on one node; the first says which."""
        return _slot(self.keys[0])

    @property
    def slots(self) -> set[int]:
        """Every slot it touches: its first key's, and its undeclared keys'."""
        return {self.slot, *map(_slot, self.across)}

    def command(self) -> bytes:
        if not self.sha:
            return b"".join(_ENCODE(self.script, *self.keys, *self.args))
        return b"".join(_ENCODE("EVALSHA", self.sha, len(self.keys), *self.keys, *self.args))


# The collapsed order and cancel (one node, several slots): their undeclared keys are the
# pools of their phones, whose other calls (reserves, settles, grants) they commute with at
# this bench's stock (10^9: no line is ever short), so the replay need not keep their order
# with those; every other script across slots (the stripe order) keeps it (streams).
COMMUTING_ACROSS = frozenset({"place_order", "cancel_order"})
# Commands whose first argument is not a key: they cannot be routed to one node's replay
# (the recording counts them in ``not_replayed``).
KEYLESS = frozenset(
    {"PING", "INFO", "WAIT", "CLUSTER", "READONLY", "READWRITE", "ASKING", "COMMAND", "TIME",
     "DBSIZE", "SCRIPT EXISTS", "SCRIPT FLUSH", "SCRIPT KILL", "CLIENT", "CONFIG", "HELLO",
     "SELECT", "ECHO", "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH"}
)  # fmt: skip


def _slot(key: str | bytes) -> int:
    return key_slot(key if isinstance(key, bytes) else key.encode())


def _arg(value: Any) -> str | bytes:
    """An argument as the server got it (bytes stay bytes; numbers become their digits)."""
    return value if isinstance(value, bytes | bytearray) else str(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


@dataclass
class Recording:
    """Every command the app sent through a cluster gateway, as it went to the cluster
    (redis-py's ``execute_command`` and the gateway's pipelines: scripts, reads and plain
    writes alike, whichever of the gateway's methods sent them), in the order their
    answers came, and the orders' calls then put in the order their nodes ran them (each
    node's slow log, which logs every command while the orders run: :func:`record`); each
    script's source from its ``SCRIPT LOAD``, and its name from the ``LuaScript`` the
    gateway ran. A command that failed is counted in ``failed``, not recorded."""

    calls: list[Call] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    # The SHA1s of the scripts' forms for several slots of one node (run_on_one_node's).
    across: set[str] = field(default_factory=set)
    not_replayed: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    # The pace the orders were placed at (the settler's batches follow it).
    orders_per_s: float = 0.0
    # Where the orders' calls begin (before: the creations and the warm-up's orders,
    # replayed unmeasured), how many orders the app answered (201) after it, and before.
    first_order_call: int = 0
    orders_placed: int = 0
    warm_up_placed: int = 0
    # Where the warm-up's calls begin (the creations' end).
    first_warm_up_call: int = 0
    escrow: str = ""
    # The workload's phones, in its index order (where they landed is the app's doing).
    phone_ids: list[str] = field(default_factory=list)
    # Its calls in RESP, per (part, node, connections): made at the first replay.
    encoded: dict[tuple[str, int, int], Encoded] = field(default_factory=dict, repr=False)
    encoded_for: tuple[int, ...] = ()
    # Recordings made before this one and discarded: their replay was not their run.
    discarded: int = 0
    # Order calls not found in their node's slow log (then all kept in their answers' order).
    unordered: int = 0

    def ready(self, part: str, port: int, calls: list[Call], connections: int) -> Encoded:
        """``calls`` (the ``part`` of this recording that ``port`` runs) :func:`encoded`,
        once per recording: a replay sends the same bytes every time. Made again when
        the recording's calls were replaced or added to since."""
        made_for = (id(self.calls), len(self.calls), self.first_order_call)
        if made_for != self.encoded_for:
            self.encoded, self.encoded_for = {}, made_for
        key = (part, port, connections)
        if key not in self.encoded:
            self.encoded[key] = encoded(calls, connections)
        return self.encoded[key]

    def attach(self, gateway: ClusterGateway) -> None:
        """Wrap ``gateway``'s ways out (the calls still go to the cluster)."""
        cluster = gateway.cluster
        execute_command = cluster.execute_command

        async def recorded_command(*args: Any, **options: Any) -> Any:
            try:
                reply = await execute_command(*args, **options)
            except NoScriptError:
                raise  # did not run: the gateway loads the script and sends it again
            except RedisError:
                self.failed[self.name_of(args)] += 1
                raise
            self.note(args)
            return reply

        transport = gateway.transport
        execute_many = transport.execute_many

        async def recorded_many(commands: list[tuple[Any, ...]]) -> list[Any]:
            try:
                replies = await execute_many(commands)
            except RedisError:
                for args in commands:
                    self.failed[self.name_of(args)] += 1
                raise
            for args in commands:
                self.note(args)
            return replies

        def naming(run: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def named(script: LuaScript, *rest: Any) -> Any:
                self.names[script.sha] = script.name
                return await run(script, *rest)

            return named

        run_on_one_node = gateway.run_on_one_node

        async def on_one_node(script: LuaScript, across: LuaScript, *rest: Any) -> Any:
            self.names[across.sha] = across.name
            self.across.add(across.sha)
            return await run_on_one_node(script, across, *rest)

        gateway.run_on_one_node = on_one_node  # type: ignore[method-assign]
        cluster.execute_command = recorded_command  # type: ignore[method-assign]
        transport.execute_many = recorded_many  # type: ignore[method-assign]
        gateway.run_script = naming(gateway.run_script)  # type: ignore[method-assign]
        gateway.run_read_script = naming(gateway.run_read_script)  # type: ignore[method-assign]

    @staticmethod
    def _split(args: Sequence[Any]) -> tuple[str, Sequence[Any]]:
        """The command's name and its arguments; SCRIPT's subcommand is part of the name,
        as one word ("SCRIPT LOAD", redis-py's routing) or two (the gateway's)."""
        name = _text(args[0]).upper()
        if name == "SCRIPT" and len(args) > 1:
            return f"SCRIPT {_text(args[1]).upper()}", args[2:]
        return name, args[1:]

    def name_of(self, args: Sequence[Any]) -> str:
        """A script's name (by its SHA1) or the command's."""
        name, rest = self._split(args)
        if name in ("EVALSHA", "EVALSHA_RO") and rest:
            sha = _text(rest[0])
            return self.names.get(sha, f"script {sha[:8]}")
        return name

    def note(self, args: Sequence[Any]) -> None:
        name, rest = self._split(args)
        if name == "SCRIPT LOAD":
            source = _text(rest[0])
            self.sources[hashlib.sha1(source.encode()).hexdigest()] = source
        elif name in ("EVALSHA", "EVALSHA_RO") and len(rest) > 1 and int(rest[1]) > 0:
            sha, count = _text(rest[0]), int(rest[1])
            script_args = rest[2 + count :]
            # The form for several slots takes its undeclared keys first in ARGV.
            across = ()
            if sha in self.across and self.name_of(args) not in COMMUTING_ACROSS:
                across = script_args[1 : 1 + int(script_args[0])]
            self.calls.append(
                Call(
                    self.name_of(args),
                    sha,
                    tuple(map(_arg, rest[2 : 2 + count])),
                    tuple(map(_arg, script_args)),
                    tuple(map(_arg, across)),
                )
            )
        elif name in KEYLESS or name.startswith(("SCRIPT", "EVAL")) or not rest:
            self.not_replayed[self.name_of(args)] += 1
        else:
            self.calls.append(Call(name, "", (_arg(rest[0]),), tuple(map(_arg, rest[1:]))))

    def order_calls(self) -> list[Call]:
        return self.calls[self.first_order_call :]

    def calls_by_name(self) -> dict[str, int]:
        return dict(Counter(call.script for call in self.order_calls()))


def log(line: str) -> None:
    print(f"bench_tier: {line}", file=sys.stderr, flush=True)


def by_node(calls: Iterable[Call], node_of_slot: Callable[[int], int]) -> dict[int, list[Call]]:
    """The calls each node runs (by node port), each node's in their recorded order."""
    nodes: dict[int, list[Call]] = {}
    for call in calls:
        nodes.setdefault(node_of_slot(call.slot), []).append(call)
    return nodes


def streams(calls: list[Call], count: int) -> list[list[Call]]:
    """``calls`` split into at most ``count`` connections so that calls that may touch a
    common key keep their recorded order: the slots a call touches (its first key's and
    its undeclared keys') are one group with every slot another call links them to, and
    a group's calls stay on one connection, in order. Calls of different groups touch no
    common key, so their relative order changes nothing. (A stripe order touches its
    customer's partition and its host's: without this a grant's receipt on the host could
    overtake it, and the stripe be short in the replay where it was not in the run.)"""
    group: dict[int, int] = {}

    def root(slot: int) -> int:
        while group.setdefault(slot, slot) != slot:
            group[slot] = group[group[slot]]
            slot = group[slot]
        return slot

    for call in calls:
        first, *others = call.slots
        for other in others:
            group[root(other)] = root(first)
    numbers: dict[int, int] = {}
    split: dict[int, list[Call]] = {}
    for call in calls:
        number = numbers.setdefault(root(call.slot), len(numbers))
        split.setdefault(number % count, []).append(call)
    return [split[n] for n in sorted(split)]


# ---- the order the nodes ran the calls in ------------------------------------------------

# The slow log keeps each command's first 32 arguments, the 32nd replaced by a count when
# there are more, and each argument's first 128 bytes: calls are matched on those.
SLOWLOG_ARGS = 31
SLOWLOG_ARG_BYTES = 128
SLOWLOG_LENGTH = 1_000_000


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def logged_args(argv: Sequence[str | bytes]) -> tuple[bytes, ...]:
    """A command's arguments as the slow log keeps enough of them to tell it apart."""
    head = [_bytes(arg)[:SLOWLOG_ARG_BYTES] for arg in argv[:SLOWLOG_ARGS]]
    return (head[0].upper(), *head[1:])


def call_argv(call: Call) -> list[str | bytes]:
    if not call.sha:
        return [call.script, *call.keys, *call.args]
    return ["EVALSHA", call.sha, str(len(call.keys)), *call.keys, *call.args]


def log_every_command(ports: Iterable[int], on: bool) -> None:
    """Every command each node runs into its slow log, in the order it ran them (``on``),
    or the log back to Redis's defaults and empty."""
    for port in ports:
        with client(port) as node:
            node.config_set("slowlog-max-len", SLOWLOG_LENGTH if on else 128)
            node.config_set("slowlog-log-slower-than", 0 if on else 10_000)
            node.slowlog_reset()


def logged_order(ports: Iterable[int]) -> dict[int, dict[tuple[bytes, ...], list[int]]]:
    """Per node, each logged command (as :func:`logged_args`) -> the ids the node logged it
    under, in the order it ran them."""
    order: dict[int, dict[tuple[bytes, ...], list[int]]] = {}
    for port in ports:
        with client(port) as node:
            node.response_callbacks.pop("SLOWLOG GET", None)
            entries = node.execute_command("SLOWLOG GET", SLOWLOG_LENGTH)
        ids: dict[tuple[bytes, ...], list[int]] = {}
        for entry in sorted(entries, key=lambda entry: int(entry[0])):
            ids.setdefault(logged_args(entry[3]), []).append(int(entry[0]))
        order[port] = ids
    return order


def in_the_order_run(
    calls: list[Call],
    node_of: Callable[[Call], int],
    order: dict[int, dict[tuple[bytes, ...], list[int]]],
) -> tuple[list[Call], int]:
    """``calls`` in the order their nodes ran them (each node's slow log), and how many
    were not found there; where any is not, ``calls`` as they are (their answers' order)."""
    taken: dict[tuple[int, tuple[bytes, ...]], int] = {}
    ran = []
    for n, call in enumerate(calls):
        port, logged = node_of(call), logged_args(call_argv(call))
        ids = order.get(port, {}).get(logged, [])
        k = taken.get((port, logged), 0)
        if k >= len(ids):
            return calls, sum(1 for _ in calls) - n
        taken[(port, logged)] = k + 1
        ran.append((port, ids[k], call))
    ran.sort(key=lambda item: (item[0], item[1]))
    return [call for _, _, call in ran], 0


# ---- escrow's switch (docs/escrow.md) ---------------------------------------------------

# Escrow's switch. As app/orders/handlers.py passes it with ESCROW_STRIPES on: place_order's
# ``striping_rule`` (app/orders/grants.py: STRIPING_RULE) and ``on_striped`` (the worker's
# Refiller's stripe_everywhere), with the Refiller started as app/main.py starts it
# (grants.refiller_ctx). Any other keyword of place_order named like escrow is an off-by-
# default bool switched on, or said to be unknown (escrow_options).
ESCROW_WORDS = ("escrow", "stripe", "striping")
ESCROW_ENV = "ESCROW_STRIPES"
ESCROW_WIRED = ("striping_rule", "on_striped")


def escrow_options(
    place: Callable[..., Any] = saga_service.place_order, wired: Iterable[str] = ()
) -> tuple[dict[str, Any], str]:
    """The keywords that turn escrow on in ``place`` (the saga's order path), beside those
    ``wired`` (escrow_on's), and what to say about them: ``({name: True}, "")`` for an
    off-by-default bool so named; ``({}, "")`` when there is none. A keyword so named of any
    other shape is not guessed at: none is passed, and the note says which (the report
    shows it, and the run goes on rather than losing every workload's figures)."""
    options: dict[str, Any] = {}
    unknown = []
    skip = set(wired)
    for name, parameter in inspect.signature(place).parameters.items():
        if name not in skip and any(word in name for word in ESCROW_WORDS):
            if parameter.default is False:
                options[name] = True
            else:
                unknown.append(f"{name}={parameter.default!r}")
    if unknown:
        return {}, (
            f"unknown: place_order takes {', '.join(unknown)}, which bench_tier does not "
            "know how to set (loadtests/bench_tier.py: escrow_options): the saga alone"
        )
    return options, ""


@contextlib.asynccontextmanager
async def escrow_on(
    gateway: ClusterGateway, scripts: Scripts, settler: Settler, time_scale: float = 1.0
) -> AsyncIterator[tuple[dict[str, Any], str]]:
    """Escrow switched on for a recording's order path as a worker of the app with
    ESCROW_STRIPES=1 runs it: the keywords its handler passes to place_order, and its
    Refiller started and stopped by the app's own refiller_ctx (hearing every stripe
    order's answer, granting off the request path, its settles handed to ``settler``).
    ``time_scale``: the striping horizon and the Refiller's gather and demand horizon
    that many times the app's (:func:`record`). Yields the keywords and what the report
    says of them. Where the order path has no such keywords, escrow_options' instead."""
    if not set(ESCROW_WIRED) <= inspect.signature(saga_service.place_order).parameters.keys():
        yield escrow_options()
        return
    settings = Settings.from_env(
        {
            "ADMIN_TOKEN": secrets.token_urlsafe(32),
            ESCROW_ENV: "1",
            "SAGA_RESERVATION_TTL_MS": str(RESERVATION_TTL_MS),
        }
    )
    app = web.Application()
    app[appkeys.SETTINGS] = settings
    app[appkeys.REDIS_GATEWAY] = gateway
    app[appkeys.SCRIPTS] = scripts
    app[appkeys.SETTLER] = settler
    refiller = grants.refiller_ctx(app)
    await anext(refiller)
    try:
        horizon_ms = round(grants.HORIZON_MS * time_scale)
        app[appkeys.REFILLER].horizon_ms = horizon_ms
        app[appkeys.REFILLER].delay_s *= time_scale
        options = {
            "striping_rule": grants.striping_rule(horizon_ms) if settings.escrow_stripes else "",
            "on_striped": app[appkeys.REFILLER].stripe_everywhere,
        }
        more, note = escrow_options(wired=ESCROW_WIRED)
        said = f"{ESCROW_ENV}=1: striping rule '{options['striping_rule']}', refills"
        yield {**options, **more}, note or said
    finally:
        with contextlib.suppress(StopAsyncIteration):
            await anext(refiller)


def order_path(
    scripts: Scripts, settler: Settler, options: dict[str, Any] | None = None
) -> Callable[[str, list[tuple[str, int]], str], Awaitable[Any]]:
    """POST /orders' order path on a cluster, as app/orders/handlers.py calls it: (customer
    id, lines, request id) -> the placed order. The one place this module names it.
    ``options``: more keywords for it (escrow's switch)."""
    place = functools.partial(
        saga_service.place_order,
        scripts,
        settler.settle_soon,
        reservation_ttl_ms=RESERVATION_TTL_MS,
        **(options or {}),
    )

    async def placed(customer_id: str, lines: list[tuple[str, int]], request_id: str) -> Any:
        return await place(
            customer_id=customer_id,
            lines=lines,
            autocheck=True,
            idempotency_key=None,
            idempotency_ttl=86_400,
            request_id=request_id,
        )

    return placed


async def quiet(settler: Settler, deadline_s: float = QUIET_DEADLINE_S) -> None:
    """Until nothing the service started is left to run: the settler's queued settles,
    every other task of this loop, and every timer still due on it (a flush gathered for
    later: the settler's, or any other off the request path). RuntimeError past the
    deadline, naming what still runs."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    until = time.monotonic() + deadline_s
    while True:
        await settler.drain()
        tasks = [task for task in asyncio.all_tasks() if task is not me and not task.done()]
        # BaseEventLoop's heap of timers (call_later): CPython's, stable since 3.4.
        timers = [timer for timer in getattr(loop, "_scheduled", []) if not timer.cancelled()]
        if not tasks and not timers:
            return
        left = until - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"still running after the orders: {tasks} {timers}")
        if tasks:
            await asyncio.wait(tasks, timeout=left)
        else:
            await asyncio.sleep(min(0.01, left))  # a poll: the next timer is due soon


async def record(
    ports: Sequence[int],
    workload: Workload,
    inflight: int,
    time_scale: float = 1.0,
    escrow: bool = False,
) -> Recording:
    """Create the catalogue and the customers, then place the workload's orders by the
    app's path, ``inflight`` at a time, and wait until everything it did after the
    answers is done: the recording, every call of those orders in it after
    ``first_order_call`` (its warm-up's orders before it). ``escrow``: with escrow
    switched on as the app does (escrow_on). ``time_scale``: every window of the order
    path that counts orders per unit of time that many times the app's (the settler's
    gather, escrow's striping horizon, its refills' gather and demand horizon, a dry
    stripe's pause): each window then holds as many orders as the app's own would at
    ``time_scale`` times the recording's pace."""
    # A fresh database's beliefs (record_fresh also starts a fresh process).
    HINTS.forget()
    STRIPE_HINTS.forget()
    seeds = tuple(("127.0.0.1", port) for port in ports)
    gateway = open_cluster_gateway(
        "redis://127.0.0.1",
        seeds,
        replicas=0,
        wait_ms=0,
        socket_timeout=10.0,
        max_connections=inflight * 4,
    )
    recording = Recording()
    recording.attach(gateway)
    scripts = Scripts(gateway)
    settler = Settler(gateway, scripts, settle_delay_s=SETTLE_DELAY_S * time_scale)
    try:
        STRIPE_HINTS.dry_s = DRY_S * time_scale  # the app's again below (tests record in-process)
        async with contextlib.AsyncExitStack() as switched:
            options, note = ({}, "")
            if escrow:
                options, note = await switched.enter_async_context(
                    escrow_on(gateway, scripts, settler, time_scale)
                )
            recording.escrow = note or ", ".join(f"{name}=True" for name in options)
            await _placed(recording, scripts, settler, workload, inflight, options)
        return recording
    finally:
        STRIPE_HINTS.dry_s = DRY_S
        await gateway.aclose()


async def _placed(
    recording: Recording,
    scripts: Scripts,
    settler: Settler,
    workload: Workload,
    inflight: int,
    options: dict[str, Any],
) -> None:
    """:func:`record`'s creations, then its orders, into ``recording``."""
    await scripts.load()
    created_phones = await _created(
        workload.phones,
        lambda n: create_phone(
            scripts, PhoneCreate(name=f"Tier {n}", price_cents=100, stock=STOCK)
        ),
    )
    emails = customer_emails(workload.customers)
    created_customers = await _created(
        workload.customers,
        lambda n: create_customer(
            scripts,
            CustomerCreate(
                name="Tier",
                surname=f"Customer {n}",
                email=emails[n],
                balance_cents=BALANCE_CENTS,
            ),
        ),
    )
    await quiet(settler)
    phone_ids = [phone.id for phone in created_phones]
    customer_ids = [customer.id for customer, _ in created_customers]
    recording.phone_ids = phone_ids
    place = order_path(scripts, settler, options)
    picks = list(enumerate(workload.picks()))
    ids = (scripts.gateway.cluster, customer_ids, phone_ids)
    recording.first_warm_up_call = len(recording.calls)
    if workload.warm_up:
        recording.warm_up_placed, _ = await _ran(
            recording, settler, place, picks[: workload.warm_up], inflight, ids
        )
    recording.first_order_call = len(recording.calls)
    recording.orders_placed, seconds = await _ran(
        recording, settler, place, picks[workload.warm_up :], inflight, ids
    )
    recording.orders_per_s = workload.orders / seconds


async def _ran(
    recording: Recording,
    settler: Settler,
    place: Callable[[str, list[tuple[str, int]], str], Awaitable[Any]],
    picks: list[tuple[int, tuple[int, int]]],
    inflight: int,
    ids: tuple[RedisCluster, list[str], list[str]],
) -> tuple[int, float]:
    """``picks`` placed by ``place``, ``inflight`` at a time, until nothing they started is
    left to run; their calls (the recording's from where they began) put in the order
    their nodes ran them. ``ids``: the cluster, the customers' ids and the phones'. The
    orders the app answered (201), and the seconds it took."""
    cluster, customer_ids, phone_ids = ids
    start = len(recording.calls)
    ports = [node.port for node in cluster.get_primaries()]
    log_every_command(ports, on=True)
    queue = iter(picks)
    placed = 0

    async def worker() -> None:
        nonlocal placed
        for n, (customer, phone) in queue:
            order = await place(customer_ids[customer], [(phone_ids[phone], 1)], f"tier-{n}")
            placed += not order.replayed

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    # Inside the window: what the service does after its answers (settles, grants, and
    # whatever else it queued off the request path) belongs to these orders.
    await quiet(settler)
    seconds = time.perf_counter() - began
    # Calls on one partition sent at once on two connections may be answered in the other
    # order than their node ran them; the replay keeps the order the nodes ran them in.
    try:
        ordered, unordered = in_the_order_run(
            recording.calls[start:],
            lambda call: cluster.get_node_from_key(call.keys[0]).port,
            logged_order(ports),
        )
    finally:
        log_every_command(ports, on=False)
    recording.calls[start:] = ordered
    recording.unordered += unordered
    return placed, seconds


def _record_in_this_process(job: Path) -> None:
    """record_fresh's child: the arguments in ``job``, the recording pickled beside it."""
    ports, workload, inflight, time_scale, escrow = json.loads(job.read_text())
    workload = Workload(**workload)
    recording = asyncio.run(record(ports, workload, inflight, time_scale, escrow))
    job.with_suffix(".recording").write_bytes(pickle.dumps(recording))


def record_fresh(
    cluster: LocalCluster,
    workload: Workload,
    inflight: int,
    time_scale: float = 1.0,
    escrow: bool = False,
) -> Recording:
    """:func:`record` in a fresh Python process, as a freshly started app worker: none
    of the app's in-process beliefs (chunk hints, and whatever escrow learns per worker)
    carried over from an earlier recording on another cluster."""
    ports = [node.port for node in cluster.topology().primaries()]
    with tempfile.TemporaryDirectory(prefix="bench-tier-record-") as tmp:
        job = Path(tmp) / "job"
        # JSON, not a pickle: run as ``python -m``, this module's classes are __main__'s.
        arguments = (ports, dataclasses.asdict(workload), inflight, time_scale, escrow)
        job.write_text(json.dumps(arguments))
        code = "import sys, pathlib, loadtests.bench_tier as t; "
        code += "t._record_in_this_process(pathlib.Path(sys.argv[1]))"
        subprocess.run([sys.executable, "-c", code, str(job)], cwd=ROOT, check=True, timeout=900)
        return pickle.loads(job.with_suffix(".recording").read_bytes())


async def _created(count: int, create: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """``create(n)`` for n in range(count), CREATING at once; the results in n's order."""
    results: list[Any] = []
    for start in range(0, count, CREATING):
        results += await asyncio.gather(
            *(create(n) for n in range(start, min(count, start + CREATING)))
        )
    return results


Encoded = list[tuple[bytes, int]]


# reserve_stock.lua's striping rule, its last ARGV: "<stripe_min> <hot> <horizon_ms>".
STRIPING_RULE = re.compile(r"^(\d+) (\d+) (\d+)$")
# The horizon the replay gives it: longer than any replay.
REPLAY_HORIZON_MS = 10**12


def as_replayed(call: Call) -> Call:
    """``call`` as the replay sends it. One change: reserve_stock's striping rule counts a
    phone's apart reserves per horizon of Redis TIME (docs/escrow.md 4), and the replay
    runs the same reserves many times faster, so a horizon's end could fall between them
    where it did not in the run, and a grant the run made be refused. Replayed with a
    horizon longer than the replay, a phone is striped at the same reserve as in the run,
    or earlier where the run's count was reset by a horizon's end: never later, and every
    call after it has the outcome it had (only the phone's count fields differ)."""
    if call.script != "reserve_stock" or not call.args:
        return call
    rule = STRIPING_RULE.match(_text(call.args[-1]))
    if rule is None:
        return call
    stripe_min, hot, _ = rule.groups()
    return dataclasses.replace(
        call, args=(*call.args[:-1], f"{stripe_min} {hot} {REPLAY_HORIZON_MS}")
    )


def encoded(calls: list[Call], connections: int) -> Encoded:
    """``calls`` as the RESP bytes of each of their :func:`streams` (:func:`as_replayed`),
    and how many each holds."""
    return [
        (b"".join(as_replayed(call).command() for call in stream), len(stream))
        for stream in streams(calls, connections)
    ]


def pipe(
    port: int,
    calls: list[Call],
    connections: int,
    folder: Path,
    cpus: Any,
    ready: Encoded | None = None,
    at_start: Callable[[], None] | None = None,
) -> float:
    """Send ``calls`` to the node on ``port``, ``connections`` redis-cli --pipe at once, and
    wait for every reply; the wall seconds. A reply that is an error fails the run.
    ``ready``: their :func:`encoded` form, when already made (kept in ``folder`` too).

    The clock starts once every redis-cli runs and is connected (the node counts its
    clients), and ``at_start`` (the CPU counters' first reading) runs just before it: a
    process's start and connect are not the node's work. They cost a few milliseconds a
    slice, and a primary of 3 has a third of the calls in each, so counted in the wall
    they took more of its time than of one primary's (its core busy 0.78-0.81 of the
    wall against 0.85-0.86, hot and zipf at ecaf1ad)."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = encoded(calls, connections) if ready is None else ready
    for n, (data, _) in enumerate(inputs):
        (folder / f"{port}-{n}.resp").write_bytes(data)
    before = connected_clients(port)
    procs = [
        subprocess.Popen(
            ["redis-cli", "-p", str(port), "--pipe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=rig.pinned_to(cpus, nice=0),
        )
        for _ in inputs
    ]
    try:
        # redis-cli --pipe connects before it reads its input.
        def connected() -> bool:
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError(f"redis-cli --pipe to {port}: exited before it connected")
            return connected_clients(port) >= before + len(procs)

        wait_until(
            connected,
            f"redis-cli --pipe to {port} to connect",
            PIPES_CONNECT_DEADLINE_S,
            interval=0.002,
            error=RuntimeError,
        )
        if at_start is not None:
            at_start()
        started = time.perf_counter()
        with ThreadPoolExecutor(len(procs)) as feeders:
            outputs = list(
                feeders.map(
                    lambda fed: _fed(fed[0], fed[1][0], cpus), zip(procs, inputs, strict=True)
                )
            )
        wall = time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, output, (_, count) in zip(procs, outputs, inputs, strict=True):
        if proc.returncode != 0 or f"errors: 0, replies: {count}" not in output:
            raise RuntimeError(f"redis-cli --pipe to {port}: {output[-300:]}")
    return wall


def _fed(proc: subprocess.Popen[bytes], data: bytes, cpus: Any) -> str:
    """``data`` written to ``proc``'s input from a thread on ``cpus`` (Linux pins the
    calling thread alone), and what it printed once it exited."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    output, _ = proc.communicate(data, timeout=300)
    return output.decode(errors="replace")


def connected_clients(port: int) -> int:
    """The clients connected to ``port``'s node (INFO), not counting this call's own."""
    with client(port) as node:
        return int(node.info("clients")["connected_clients"]) - 1


def key_counts(ports: Iterable[int]) -> dict[int, int]:
    counts = {}
    for port in ports:
        with client(port) as node:
            counts[port] = int(node.dbsize())
    return counts


def forks(port: int) -> int:
    """The forks ``port``'s redis-server made so far (INFO total_forks): an AOF rewrite."""
    with client(port) as node:
        return int(node.info("stats")["total_forks"])


def aof_rebased(ports: Iterable[int]) -> None:
    """Each node's AOF rewritten to its data now, the rewrite awaited, and the automatic
    rewrite turned off: no fork inside the measured window. With the default rule (grow
    100% past 64 MB) a replay forked as it went, 2 rewrites in each 1-primary replay (its
    AOF grows 3 times as fast as one of 3) and 0 or 1 in a 3-primary one. A fork's page
    copies are charged to the primary's own CPU and its child shares the primary's core:
    a replay that forked paid for a rewrite the other replay may not have."""
    ports = list(ports)
    deadline = time.monotonic() + AOF_REWRITE_DEADLINE_S
    for port in ports:
        with client(port) as node:
            node.config_set("auto-aof-rewrite-percentage", 0)
            _rewrite_done(node, port, deadline)  # one the old rule started
            node.bgrewriteaof()
    for port in ports:
        with client(port) as node:
            state = _rewrite_done(node, port, deadline)
            if state["aof_last_bgrewrite_status"] != "ok":
                raise RuntimeError(f"the AOF rewrite of {port} failed")


def _rewrite_done(node: Any, port: int, deadline: float) -> dict[str, Any]:
    """Poll ``node`` until no AOF rewrite runs or waits; its persistence INFO then."""
    while True:
        state = node.info("persistence")
        if not (state["aof_rewrite_in_progress"] or state["aof_rewrite_scheduled"]):
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(f"the AOF rewrite of {port} did not end")
        time.sleep(0.05)


def flush(cluster: LocalCluster) -> None:
    for node in cluster.topology().primaries():
        with client(node.port) as primary:
            primary.flushall()


@dataclass
class Prepared:
    """A cluster flushed and seeded for a replay of ``recording``: its primaries' ports,
    each one's order calls, and the keys each held after the recording."""

    cluster: LocalCluster
    recording: Recording
    ports: list[int]
    order_calls: dict[int, list[Call]]
    after_recording: dict[int, int]


def prepared(
    cluster: LocalCluster,
    recording: Recording,
    connections: int,
    folder: Path,
    split: rig.CpuSplit,
) -> Prepared:
    """Flush, load the scripts, pin the primaries, replay the creations (not measured) and
    rebase the AOFs (:func:`aof_rebased`): ready for the timed order calls."""
    view = cluster.topology()
    ports = sorted(node.port for node in view.primaries())
    missing = {call.sha for call in recording.calls if call.sha} - recording.sources.keys()
    if missing:
        raise RuntimeError(f"no source recorded for the scripts {sorted(missing)}")
    after_recording = key_counts(ports)
    flush(cluster)
    for port in ports:
        with client(port) as node:
            for source in recording.sources.values():
                node.script_load(source)
            if split.pinned:
                rig.pin_tree(cluster.procs[port].pid, split.stack)

    def node_of_slot(slot: int) -> int:
        return view.primary_for_slot(slot).port

    # The creations, then the warm-up's orders: an order's collapsed form reads its phone
    # undeclared (COMMUTING_ACROSS), so no stream keeps it after the phone's creation.
    warm_up = recording.first_warm_up_call or recording.first_order_call
    for part, (begin, end) in {
        "seed": (0, warm_up),
        "warm-up": (warm_up, recording.first_order_call),
    }.items():
        for port, calls in by_node(recording.calls[begin:end], node_of_slot).items():
            ready = recording.ready(part, port, calls, connections)
            pipe(port, calls, connections, folder / part, split.load or None, ready)
    aof_rebased(ports)
    order_calls = by_node(recording.order_calls(), node_of_slot)
    return Prepared(cluster, recording, ports, order_calls, after_recording)


def timed(
    ready: Prepared,
    port: int,
    part: tuple[int, int],
    connections: int,
    folder: Path,
    split: rig.CpuSplit,
) -> dict[str, Any]:
    """Part ``k`` of ``n`` (``part``) of ``port``'s order calls, saturated: the calls (and
    how many of each script or command), the primary's CPU seconds and the wall seconds,
    how long the stack CPUs were busy meanwhile, whoever ran on them, and its forks."""
    every = ready.order_calls.get(port, [])
    k, n = part
    calls = every[len(every) * k // n : len(every) * (k + 1) // n]
    row: dict[str, Any] = {"port": port, "calls": len(calls), "scripts": {}, "cpu_s": 0.0,
                           "wall_s": 0.0, "stack_busy_s": 0.0, "forks": 0,
                           "pipes": connections}  # fmt: skip
    if not calls:
        return row
    stack_cpus = split.stack or frozenset(os.sched_getaffinity(0))
    counted: dict[str, float] = {}

    def at_start() -> None:
        counted["forks"] = forks(port)  # before the CPU is read: its INFO is not the window's
        counted["cpu"], counted["busy"] = cpu_seconds(port), rig.cpu_times(stack_cpus)["cpus_busy"]

    encoded_calls = ready.recording.ready(f"orders {k}/{n}", port, calls, connections)
    wall = pipe(
        port, calls, connections, folder / "orders", split.load or None, encoded_calls, at_start
    )
    row["cpu_s"] = cpu_seconds(port) - counted["cpu"]
    row["stack_busy_s"] = rig.cpu_times(stack_cpus)["cpus_busy"] - counted["busy"]
    row["forks"] = forks(port) - int(counted["forks"])  # after the CPU was read, likewise
    row["wall_s"] = wall
    row["scripts"] = dict(Counter(call.script for call in calls))
    return row


def added(rows: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Two :func:`timed` rows of one primary as one."""
    scripts = Counter(rows["scripts"]) + Counter(more["scripts"])
    summed = {key: rows[key] + more[key] for key in ("calls", "cpu_s", "wall_s",
                                                     "stack_busy_s", "forks")}  # fmt: skip
    return {"port": rows["port"], **summed, "scripts": dict(scripts), "pipes": rows["pipes"]}


def checked(ready: Prepared, audited: bool = True) -> None:
    """That it was the recording's run: every primary holds the keys it held after the
    recording, and the conservation audit over every primary (app/admin/audit.py) holds at
    rest with exactly the orders the app placed; RuntimeError otherwise."""
    replayed = key_counts(ready.ports)
    if replayed != ready.after_recording:
        raise RuntimeError(
            f"the replay left {replayed} keys per node, the recording {ready.after_recording}"
        )
    if audited:
        recording = ready.recording
        check_audit(
            asyncio.run(audit(ready.ports)), recording.orders_placed + recording.warm_up_placed
        )


def replay(
    cluster: LocalCluster,
    recording: Recording,
    connections: int,
    folder: Path,
    split: rig.CpuSplit,
    audited: bool = True,
) -> list[dict[str, Any]]:
    """:func:`prepared`, then each primary's order calls saturated in turn (a :func:`timed`
    row each), then :func:`checked`."""
    ready = prepared(cluster, recording, connections, folder, split)
    rows = [timed(ready, port, (0, 1), connections, folder, split) for port in ready.ports]
    checked(ready, audited)
    return rows


def fewest_calls(ready: Iterable[Prepared]) -> int:
    """The order calls of the primary that has the fewest."""
    return min(
        len(prepared.order_calls.get(port, [])) for prepared in ready for port in prepared.ports
    )


def alike_pipes(ready: Iterable[Prepared], connections: int) -> int:
    """The pipes every primary of every shard count can have (:func:`streams`), at most
    ``connections``: each primary's calls are replayed over as many connections as every
    other's. A node serves one event loop turn per 16 KB a connection sends, and each turn
    writes and syncs the AOF once, so a primary fed by one pipe pays those per ~20 calls
    where one fed by 8 pays them per ~160. And one pipe is all a primary of 3 can have
    with stripes: a stripe order links its customer's partition to its host's, the host
    is shared by all of the primary's partitions, and their calls must keep their order,
    while 1 primary places every order in one script, linking nothing. On hot (60,000
    orders, 5 paired replays, 2026-12-03), 3 primaries on 1 pipe against 1 on 8 gave (a)
    1.15 to 1.18 in every replay, and both on 1 pipe 0.98 to 1.12; Redis's instructions
    (callgrind, 6,000 orders) are 589k per stripe order against 563k per place_order."""
    return min(
        [connections]
        + [
            len(streams(prepared.order_calls.get(port, []), connections))
            for prepared in ready
            for port in prepared.ports
            if prepared.order_calls.get(port)
        ]
    )


class NotTheRun(RuntimeError):
    """The replays of some shard counts (``errors``: shard count -> what was wrong) were
    not their recording's run."""

    def __init__(self, errors: dict[int, RuntimeError]) -> None:
        super().__init__("; ".join(f"on {n}: {error}" for n, error in errors.items()))
        self.errors = errors


def replayed_together(
    recorded: dict[int, Recorded],
    connections: int,
    folder: Path,
    split: rig.CpuSplit,
    parts: int = REPLAY_PARTS,
    first: int | None = None,
    audited: bool = True,
) -> dict[int, list[dict[str, Any]]]:
    """Every recording replayed at once, in ``parts`` slices taken in turn: each cluster
    :func:`prepared`, then slice k of every primary of one, of the other, slice k+1 in the
    other order... so that the box's slow and fast seconds fall on both shard counts alike
    (each primary's calls keep their order; a replay never mixed nodes' order anyway).
    ``first``: the shard count that starts. Per shard count its rows, one per primary;
    then :func:`checked` for each, NotTheRun naming those that were not their run."""
    counts = sorted(recorded)
    if first is not None:
        counts.sort(key=lambda n: n != first)
    ready = {
        n: prepared(cluster, recording, connections, folder / f"p{n}", split)
        for n, (cluster, recording) in recorded.items()
    }
    pipes = alike_pipes(ready.values(), connections)
    parts = min(parts, max(1, fewest_calls(ready.values()) // SLICE_CALLS_MIN))
    rows: dict[int, dict[int, dict[str, Any]]] = {n: {} for n in counts}
    for k in range(parts):
        for n in counts if k % 2 == 0 else counts[::-1]:
            for port in ready[n].ports:
                row = timed(ready[n], port, (k, parts), pipes, folder / f"p{n}", split)
                rows[n][port] = added(rows[n][port], row) if port in rows[n] else row
    errors = {}
    for n in counts:
        try:
            checked(ready[n], audited)
        except RuntimeError as error:
            errors[n] = error
    if errors:
        raise NotTheRun(errors)
    return {n: [rows[n][port] for port in ready[n].ports] for n in sorted(counts)}


def check_audit(audited: dict[str, Any], orders_placed: int) -> None:
    """RuntimeError unless the audit held at rest with exactly ``orders_placed`` orders,
    every one completed (the recording's orders are placed with autocheck)."""
    orders = audited["orders"]
    if (
        not (audited["ok"] and audited["at_rest"])
        or orders["total"] != orders_placed
        or orders[COMPLETED] != orders_placed
    ):
        failed = [check for check in audited["checks"] if check["ok"] is not True]
        raise RuntimeError(
            f"the audit after the replay: ok {audited['ok']}, at rest {audited['at_rest']}, "
            f"{orders['total']} orders ({orders[COMPLETED]} completed) where the app placed "
            f"{orders_placed}: {failed}"
        )


def median_rows(replays: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per primary, the median of each timed figure over the replays (the same calls), the
    forks of them all, and its CPU seconds in each replay."""
    timed = ("cpu_s", "wall_s", "stack_busy_s")
    return [
        {
            **rows[0],
            **{key: statistics.median(row[key] for row in rows) for key in timed},
            "forks": sum(row["forks"] for row in rows),
            "cpu_s_each": [row["cpu_s"] for row in rows],
        }
        for rows in zip(*replays, strict=True)
    ]


def end_to_end(
    cluster: LocalCluster, split: rig.CpuSplit, seconds: int, folder: Path
) -> dict[str, Any]:
    """make bench's stack on ``cluster``: wrk POST /orders through nginx."""
    # loadtests.bench lists this module among its sections: imported when run, not before.
    from loadtests.bench import pin, stack_env

    nodes = ",".join(f"127.0.0.1:{node.port}" for node in cluster.topology().primaries())
    env = {"REDIS_CLUSTER_NODES": nodes, "REDIS_WAIT_REPLICAS": "0"}
    cpus = split.load or None
    with launch(env=stack_env(folder / "web-access.log", env), instances=2, workers=1) as stack:
        pin(stack, split)
        if split.pinned:
            for proc in cluster.procs.values():
                rig.pin_tree(proc.pid, split.stack)
        phone_ids, people = provision(stack, phones=20, customers=50)
        data = folder / "wrk-data.lua"
        write_wrk_data(data, phone_ids, people)
        orders_wrk(stack, data, seconds=2, cpus=cpus)  # warm-up
        result = orders_wrk(stack, data, seconds=seconds, cpus=cpus)
    return {"orders_per_s": result["ok_rps"], "statuses": result["statuses"]}


def shard_figures(primaries: int, orders: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One shard count's figures from its primaries' replays (rows of :func:`replay`)."""
    cpu = sum(row["cpu_s"] for row in rows)
    busiest = max(rows, key=lambda row: row["cpu_s"])
    slowest = max(rows, key=lambda row: row["wall_s"])
    return {
        "primaries": primaries,
        "orders": orders,
        "calls_per_order": sum(row["calls"] for row in rows) / orders,
        "calls_per_order_by_script": {
            script: sum(row["scripts"].get(script, 0) for row in rows) / orders
            for script in sorted({name for row in rows for name in row["scripts"]})
        },
        "cpu_us_per_order": cpu * 1e6 / orders,
        # Per replay (the rows of median_rows): the replays were paired, see verdicts.
        "cpu_us_per_order_each": [
            sum(each) * 1e6 / orders
            for each in zip(*(row.get("cpu_s_each", []) for row in rows), strict=True)
        ],
        "cpu_share": [row["cpu_s"] / cpu if cpu else 0.0 for row in rows],
        "forks": sum(row["forks"] for row in rows),
        "pipes": max((row.get("pipes", 0) for row in rows), default=0),
        "busiest_cpu_us_per_order": busiest["cpu_s"] * 1e6 / orders,
        "measured_ceiling": orders / slowest["wall_s"] if slowest["wall_s"] else 0.0,
        "derived_ceiling": orders / busiest["cpu_s"] if busiest["cpu_s"] else 0.0,
        "core_busy": [_per_wall(row, row["cpu_s"]) for row in rows],
        # That core's busy time, whoever ran (/proc/stat): well under 1, fsync waits or the
        # pipes set the primary's pace, not the CPU; near 1 on a shared box, other processes
        # may have filled such waits. Ticks are 10 ms: capped at 1.
        "core_never_idle": [min(1.0, _per_wall(row, row["stack_busy_s"])) for row in rows],
        "per_primary": rows,
    }


def _per_wall(row: dict[str, Any], seconds: float) -> float:
    return seconds / row["wall_s"] if row["wall_s"] else 0.0


def verdicts(one: dict[str, Any], three: dict[str, Any]) -> dict[str, Any]:
    """Issue 11's 3-to-1 ratios and whether each target is met."""

    def ratio(key: str) -> float:
        return three[key] / one[key] if one[key] else 0.0

    cpu = ratio("cpu_us_per_order")
    measured, derived = ratio("measured_ceiling"), ratio("derived_ceiling")
    # Replay i of 1 primary was replayed together with replay i of 3 (alternated).
    paired = zip(
        one.get("cpu_us_per_order_each", []), three.get("cpu_us_per_order_each", []), strict=True
    )
    return {
        "cpu_per_order": cpu,
        "cpu_per_order_each": [b / a for a, b in paired if a],
        "cpu_per_order_met": cpu <= CPU_PER_ORDER_MAX,
        "measured_ceiling": measured,
        "measured_ceiling_met": measured >= CEILING_MIN,
        "derived_ceiling": derived,
        "derived_ceiling_met": derived >= CEILING_MIN,
        "end_to_end": ratio("end_to_end_orders_per_s")
        if "end_to_end_orders_per_s" in one
        else None,
    }


Recorded = tuple[LocalCluster, Recording]


def alternated(
    recorded: dict[int, Recorded],
    repeats: int,
    connections: int,
    folder: Path,
    split: rig.CpuSplit,
    again: dict[int, Callable[[], Recording]] | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """The recordings replayed together ``repeats`` times (:func:`replayed_together`, the
    shard count that starts alternating), so that drift on the shared box hits both
    alike; per primary the medians.

    A recording whose first replay is not its run (the keys or the audit differ) is made
    again by ``again[n]`` (up to RECORD_ATTEMPTS in all; ``recorded`` is updated, and
    ``discarded`` counts them): the recording takes calls in the order their answers
    came, and two calls on one partition sent at once on two connections may be answered
    in the other order than the node ran them, which matters only where their order
    changes an outcome (a stripe order and its stripe's receipt)."""
    counts = sorted(recorded)
    replays: dict[int, list[list[dict[str, Any]]]] = {n: [] for n in counts}
    for turn in range(repeats):
        for attempt in range(RECORD_ATTEMPTS):
            began = time.monotonic()
            starts = counts[turn % len(counts)]
            try:
                # The same calls every time: the audit after the first replay says for all.
                rows = replayed_together(
                    recorded, connections, folder, split, first=starts, audited=turn == 0
                )
            except NotTheRun as error:
                if turn or again is None or attempt + 1 == RECORD_ATTEMPTS:
                    raise
                for n, wrong in error.errors.items():
                    log(f"{folder.name} on {n}: not the recording's run ({wrong}); again")
                    cluster, recording = recorded[n]
                    recorded[n] = (cluster, again[n]())
                    recorded[n][1].discarded = recording.discarded + 1
                continue
            cpu = {
                n: sum(row["cpu_s"] for row in rows[n]) / recorded[n][1].orders_placed
                for n in counts
            }
            log(
                f"{folder.name} replay {turn + 1}: {time.monotonic() - began:.1f} s; "
                + "; ".join(f"{n} primaries {cpu[n] * 1e6:.1f} us/order" for n in counts)
                + "; forks "
                + ", ".join(str(sum(row["forks"] for row in rows[n])) for n in counts)
            )
            for n in counts:
                replays[n].append(rows[n])
            break
    return {n: median_rows(rows) for n, rows in replays.items()}


def figures_of(primaries: int, recording: Recording, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`shard_figures` of a recording's replays, with what the recording says."""
    figures = shard_figures(primaries, recording.orders_placed, rows)
    figures["orders_per_s_recorded"] = recording.orders_per_s
    figures["not_replayed_per_order"] = {
        name: n / recording.orders_placed for name, n in sorted(recording.not_replayed.items())
    }
    figures["failed"] = dict(recording.failed)
    figures["discarded"] = recording.discarded
    return figures


def phone_shares(cluster: LocalCluster, recording: Recording, workload: Workload) -> list[float]:
    """Per primary (by port, as the replay's rows), the share of the workload's orders whose
    phone it serves: where the app's random placement put the busy phones."""
    view = cluster.topology()
    ports = sorted(node.port for node in view.primaries())
    primary = [
        view.primary_for_slot(key_slot(keys.phone(phone_id).encode())).port
        for phone_id in recording.phone_ids
    ]
    served = Counter(primary[phone] for _, phone in workload.picks()[workload.warm_up :])
    return [served[port] / workload.orders for port in ports]


def measure_workload(
    clusters: dict[int, LocalCluster],
    workload: Workload,
    inflight: int,
    connections: int,
    repeats: int,
    folder: Path,
    split: rig.CpuSplit,
    at_the_ceiling: bool = True,
) -> dict[str, Any]:
    """One workload on both clusters: each flushed and recorded by a fresh process,
    then their replays alternating; then (``at_the_ceiling``) the 3-primary orders again
    with the settles gathered as at its ceiling."""
    began = time.monotonic()
    escrow = workload.escrow
    for cluster in clusters.values():
        flush(cluster)  # the same customers on every recording: their e-mails must be free

    def recorded_on(n: int) -> Recorded:
        began_n = time.monotonic()
        recording = record_fresh(clusters[n], workload, inflight, escrow=escrow)
        log(f"{workload.name} recorded on {n}: {time.monotonic() - began_n:.1f} s")
        return clusters[n], recording

    # The hot ones on both clusters at once (two processes, each its own cluster), for
    # time: nothing of a recording is measured but its pace, which sets only how many
    # settles a batch holds (the second table models the batches at the ceiling instead).
    # The uniform one one after the other, as it always was, so its figures stay comparable.
    at_once = 1 if workload.name == "uniform" else len(clusters)
    with ThreadPoolExecutor(at_once) as recorders:
        recorded = dict(zip(clusters, recorders.map(recorded_on, clusters), strict=True))

    def again(n: int) -> Callable[[], Recording]:
        def recorded_again() -> Recording:
            flush(clusters[n])
            return record_fresh(clusters[n], workload, inflight, escrow=escrow)

        return recorded_again

    medians = alternated(
        recorded, repeats, connections, folder, split, {n: again(n) for n in clusters}
    )
    result: dict[str, Any] = {
        "workload": {
            "name": workload.name,
            "phones": workload.phones,
            "orders": workload.orders,
            "customers": workload.customers,
            "popularity": workload.popularity,
            "seed": workload.seed,
            "described": workload.describe(),
        },
        "escrow": recorded[3][1].escrow,
        "escrow_asked": escrow,
        "replays": repeats,
    }
    for n, (cluster, recording) in recorded.items():
        result[f"p{n}"] = figures_of(n, recording, medians[n])
        result[f"p{n}"]["orders_phones_share"] = phone_shares(cluster, recording, workload)
    result["ratios"] = verdicts(result["p1"], result["p3"])
    seconds = {"record, replays": time.monotonic() - began}
    if at_the_ceiling:
        result["at_the_ceiling"] = as_at_the_ceiling(
            recorded, result["p3"], workload, inflight, repeats, connections, folder, split
        )
        seconds["the same, as at the ceiling"] = time.monotonic() - began - sum(seconds.values())
    result["seconds"] = seconds
    print(f"bench_tier {workload.name}: {seconds}", file=sys.stderr, flush=True)
    return result


def measure(
    workloads: Sequence[Workload],
    inflight: int,
    connections: int,
    repeats: int,
    e2e_seconds: int,
    folder: Path,
    hot_repeats: int | None = None,
) -> dict[str, Any]:
    """Both clusters up at once; per workload, each recorded, then their replays
    alternating, and again with the 3-primary settles gathered as at its ceiling; then end
    to end. ``hot_repeats``: the replays of the workloads other than ``uniform``."""
    split = rig.cpu_split()
    result: dict[str, Any] = {
        "split": split.describe(),
        "load_average": [os.getloadavg()[0]],
        "workloads": {},
        "not_measured": {},
    }
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as running:
        clusters = {}
        for primaries in (1, 3):
            cluster = LocalCluster.on_free_ports(
                folder / f"p{primaries}" / "cluster", primaries, replicas=0
            )
            running.callback(cluster.stop)
            cluster.start()
            clusters[primaries] = cluster
        for workload in workloads:
            began = time.monotonic()
            times = repeats if workload.name == "uniform" or hot_repeats is None else hot_repeats
            try:
                result["workloads"][workload.name] = measure_workload(
                    clusters, workload, inflight, connections, times, folder / workload.name, split
                )
            except RuntimeError as error:
                # Said in the report; the other workloads are still measured.
                log(f"{workload.name} not measured: {error}")
                result["not_measured"][workload.name] = str(error)
            seconds[workload.name] = time.monotonic() - began
        if e2e_seconds:
            began = time.monotonic()
            e2e = {
                n: end_to_end(cluster, split, e2e_seconds, folder / f"p{n}")["orders_per_s"]
                for n, cluster in clusters.items()
            }
            result["end_to_end_orders_per_s"] = e2e
            # Shown beside the uniform workload's figures, as it always was.
            uniform = result["workloads"].get("uniform")
            if uniform is not None:
                for n, orders_per_s in e2e.items():
                    uniform[f"p{n}"]["end_to_end_orders_per_s"] = orders_per_s
                uniform["ratios"] = verdicts(uniform["p1"], uniform["p3"])
            seconds["end to end"] = time.monotonic() - began
    print(f"bench_tier: {seconds}", file=sys.stderr, flush=True)
    result["seconds"] = seconds
    result["load_average"].append(os.getloadavg()[0])
    return result


def as_at_the_ceiling(
    recorded: dict[int, Recorded],
    three: dict[str, Any],
    workload: Workload,
    inflight: int,
    repeats: int,
    connections: int,
    folder: Path,
    split: rig.CpuSplit,
) -> dict[str, Any]:
    """The orders recorded again on both shard counts as the app would place them at the
    3-primary ceiling just derived: every window of its order path that counts orders per
    unit of time stretched by that ceiling over the recording's pace (:func:`record`'s
    ``time_scale``: at that rate each window holds as many orders), and, with escrow,
    after a warm-up of as many orders (:class:`Workload`: a tier at its ceiling has been
    selling, its stripes in place); replayed alternating."""
    scale = three["derived_ceiling"] / max(recorded[3][1].orders_per_s, 1.0)
    warmed = dataclasses.replace(workload, warm_up=workload.orders if workload.escrow else 0)

    def recorded_again(n: int) -> Callable[[], Recording]:
        def again() -> Recording:
            flush(recorded[n][0])  # the same customers again: their e-mails must be free
            return record_fresh(
                recorded[n][0], warmed, inflight, time_scale=scale, escrow=warmed.escrow
            )

        return again

    again = {n: recorded_again(n) for n in recorded}
    # Both at once (two processes, each its own cluster), for time, as measure_workload's.
    with ThreadPoolExecutor(len(again)) as recorders:
        made = dict(zip(again, recorders.map(lambda n: again[n](), again), strict=True))
    at_ceiling = {n: (recorded[n][0], made[n]) for n in recorded}
    medians = alternated(at_ceiling, repeats, connections, folder / "at_the_ceiling", split, again)
    one = figures_of(1, at_ceiling[1][1], medians[1])
    many = figures_of(3, at_ceiling[3][1], medians[3])
    return {
        "time_scale": scale,
        "settle_window_s": SETTLE_DELAY_S * scale,
        "warm_up": warmed.warm_up,
        "p1": one,
        "p3": many,
        "ratios": verdicts(one, many),
    }


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _core_rows(
    one: dict[str, Any], three: dict[str, Any], ratios: dict[str, Any]
) -> list[tuple[str, ...]]:
    """Calls, CPU per order (a), its split, and the ceilings (b): 1 primary against 3."""
    return [
        ("script calls per order (all primaries)", f"{one['calls_per_order']:.2f}",
         f"{three['calls_per_order']:.2f}", "", ""),
        ("the same, by script", _by_script(one), _by_script(three), "", ""),
        ("Redis CPU µs per order, summed over the primaries (a)", f"{one['cpu_us_per_order']:.1f}",
         f"{three['cpu_us_per_order']:.1f}", f"{ratios['cpu_per_order']:.2f}",
         f"≤ {CPU_PER_ORDER_MAX} {_met(ratios['cpu_per_order_met'])}"),
        ("each primary's share of that CPU", _shares(one["cpu_share"]), _shares(three["cpu_share"]), "", ""),
        ("busiest primary's CPU µs per order", f"{one['busiest_cpu_us_per_order']:.1f}",
         f"{three['busiest_cpu_us_per_order']:.1f}", "", ""),
        ("ceiling, **measured**: slowest primary saturated, orders/s (b)",
         f"{one['measured_ceiling']:,.0f}", f"{three['measured_ceiling']:,.0f}",
         f"{ratios['measured_ceiling']:.2f}", f"≥ {CEILING_MIN} {_met(ratios['measured_ceiling_met'])}"),
        ("ceiling, **derived**: orders / busiest primary's CPU s (b)",
         f"{one['derived_ceiling']:,.0f}", f"{three['derived_ceiling']:,.0f}",
         f"{ratios['derived_ceiling']:.2f}", f"≥ {CEILING_MIN} {_met(ratios['derived_ceiling_met'])}"),
    ]  # fmt: skip


def _table(rows: list[tuple[str, ...]], heading: str = "") -> str:
    lines = [f"| {heading} | 1 primary | 3 primaries | 3 / 1 | target |", "|---|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in rows])


def markdown(result: dict[str, Any]) -> str:
    """The section: the uniform workload's tables as they always were, then every
    workload side by side (docs/escrow.md section 9)."""
    workloads = result["workloads"]
    parts = []
    if "uniform" in workloads:
        parts.append(_uniform_markdown(workloads["uniform"], result))
    if workloads:
        parts.append(_workloads_markdown(workloads))
    for name, error in result.get("not_measured", {}).items():
        parts.append(f"Workload `{name}` not measured: `{error}`\n")
    return "\n".join(parts)


def _uniform_markdown(uniform: dict[str, Any], result: dict[str, Any]) -> str:
    one, three, ratios = uniform["p1"], uniform["p3"], uniform["ratios"]
    ceiling = uniform["at_the_ceiling"]
    workload = uniform["workload"]
    start, end = result["load_average"]
    e2e = ratios["end_to_end"]
    rows = [
        *_core_rows(one, three, ratios),
        ("each primary's core busy while saturated (its CPU / wall)", _shares(one["core_busy"]),
         _shares(three["core_busy"]), "", ""),
        ("that core busy meanwhile, whoever ran (1 = never idle)", _shares(one["core_never_idle"]),
         _shares(three["core_never_idle"]), "", ""),
    ]  # fmt: skip
    if e2e is not None:
        rows.append(
            (
                "end to end: POST /orders/s through nginx, 2 instances x 1 worker (c)",
                f"{one['end_to_end_orders_per_s']:,.0f}",
                f"{three['end_to_end_orders_per_s']:,.0f}",
                f"{e2e:.2f}",
                "shown beside",
            )
        )
    table = _table(rows)
    at_the_ceiling = _table(
        _core_rows(ceiling["p1"], ceiling["p3"], ceiling["ratios"]),
        f"as at the 3-primary ceiling: the order path's windows {ceiling['time_scale']:.1f} "
        f"times the app's (the settler's {ceiling['settle_window_s']:.2f} s instead of "
        f"{SETTLE_DELAY_S})",
    )
    return f"""{table}

How: `python -m loadtests.bench_tier` (its docstring). {one["orders"]:,} one-line orders by the app's
order path on a cluster, {workload["phones"]} phones placed as the app mints them and {workload["customers"]} customers as many
in every partition (e-mails chosen so: a shop's many customers spread so by their hash); every command the service sent for them recorded (scripts and plain commands,
until nothing it started was left to run), then replayed on a flushed cluster with each
primary saturated in turn (`redis-cli --pipe`, on the load CPUs; the primary on the stack CPU;
{result["split"]}), both clusters' replays together in slices taken in turn, every primary
over as many pipes, its AOF rewritten before and not during. No replicas, AOF `appendfsync
always`. Load average {start:.1f} at the start,
{end:.1f} at the end.

- **Measured** is what a primary did saturated, alone on the stack CPU: the tier's ceiling is
  its slowest primary (each primary on a core of its own, the others keeping up). It counts
  whatever else ran on that core meanwhile: on a shared box the primary got only the share of
  it shown above. **Derived** divides the orders by the busiest primary's CPU seconds: the
  ceiling with a core per shard if CPU is the limit. Idle time on that core (below 1 above)
  means something else set the pace (fsync waits with `always`, or the pipes), and then
  measured is the figure; a core never idle cannot tell the two apart (other processes fill
  the waits), a quiet machine can. Each primary's share of the CPU says whether the work
  splits evenly: the busiest one sets the tier's ceiling.
- The replay sends the calls the app made at the recording's pace ({one["orders_per_s_recorded"]:,.0f} and
  {three["orders_per_s_recorded"]:,.0f} orders/s). The settler gathers 50 ms of settles into one call per phone
  partition, so at a primary's ceiling each call would hold more orders. The second table
  models that: the orders recorded again on both with every window of the order path that
  counts orders per unit of time (here the settler's) stretched by the derived ceiling over
  the recording's pace (each call then holds as many orders as 50 ms hold at that
  ceiling), replayed alternating:

{at_the_ceiling}

- Three primaries saturated at once beside their driver need at least 4 cores; this box's
  {os.cpu_count()} would measure the box. The even split of CPU over the primaries (each
  one's share above) is what lets the ceiling grow with them.
- End to end the Python tier saturates the 2 cores before Redis does, so (c) does not show the
  scale-out; it shows what the cluster costs the whole stack.
"""


def _by_script(figures: dict[str, Any]) -> str:
    calls = figures["calls_per_order_by_script"]
    return ", ".join(f"{script} {n:.2f}" for script, n in calls.items())


def _shares(values: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


def _escrow(figures: dict[str, Any]) -> str:
    if figures["escrow"].startswith("unknown"):
        return figures["escrow"]
    if figures["escrow"]:
        return f"on ({figures['escrow']})"
    if figures["escrow_asked"]:
        return "off: the app has no escrow switch yet (the saga alone)"
    return "off"


def _ratio_rows(
    workloads: list[dict[str, Any]], key: str, label: str, target: str
) -> list[tuple[str, ...]]:
    """(a) or (b) 3 / 1 per workload, as recorded and as at the ceiling."""
    met = f"{key}_met"

    def cell(ratios: dict[str, Any] | None) -> str:
        return f"{ratios[key]:.2f} {_met(ratios[met])}" if ratios else "not measured"

    return [
        (label, *(cell(w["ratios"]) for w in workloads), target),
        (
            f"the same, as at the 3-primary ceiling ({AT_THE_CEILING})",
            *(
                cell(w["at_the_ceiling"]["ratios"] if "at_the_ceiling" in w else None)
                for w in workloads
            ),
            target,
        ),
    ]


def _at_the_ceiling(workload: dict[str, Any]) -> str:
    ceiling = workload.get("at_the_ceiling")
    return f"{ceiling['time_scale']:.1f}; {ceiling['warm_up']:,}" if ceiling else "·"


def _calls_at_the_ceiling(workload: dict[str, Any]) -> str:
    ceiling = workload.get("at_the_ceiling")
    if not ceiling:
        return "·"
    return f"{ceiling['p1']['calls_per_order']:.2f} / {ceiling['p3']['calls_per_order']:.2f}"


def _spread(ratios: dict[str, Any]) -> str:
    each = ratios.get("cpu_per_order_each") or []
    return f"{min(each):.2f} to {max(each):.2f}" if each else "·"


def _workloads_markdown(workloads: dict[str, dict[str, Any]]) -> str:
    """Every workload side by side: its parameters, (a) and (b), and the calls per order
    by script (docs/escrow.md section 9: the hot ones are where escrow can pay)."""
    names = list(workloads)
    chosen = [workloads[name] for name in names]
    head = f"| 3 primaries against 1 | {' | '.join(names)} | target |"
    rule = "|---" * (len(names) + 2) + "|"
    rows: list[tuple[str, ...]] = [
        ("workload", *(w["workload"]["described"] for w in chosen), ""),
        ("escrow (docs/escrow.md)", *(_escrow(w) for w in chosen), ""),
        ("replays (medians of)", *(str(w["replays"]) for w in chosen), ""),
        (
            "recordings discarded, their replay not their run (1 / 3 primaries)",
            *(f"{w['p1'].get('discarded', 0)} / {w['p3'].get('discarded', 0)}" for w in chosen),
            "",
        ),
        (
            "recorded at, orders/s (1 / 3 primaries)",
            *(
                f"{w['p1']['orders_per_s_recorded']:,.0f} / {w['p3']['orders_per_s_recorded']:,.0f}"
                for w in chosen
            ),
            "",
        ),
        (
            "script calls per order (1 / 3 primaries)",
            *(f"{w['p1']['calls_per_order']:.2f} / {w['p3']['calls_per_order']:.2f}" for w in chosen),
            "",
        ),
        (
            "Redis CPU µs per order (1 / 3 primaries)",
            *(
                f"{w['p1']['cpu_us_per_order']:.1f} / {w['p3']['cpu_us_per_order']:.1f}"
                for w in chosen
            ),
            "",
        ),
        *_ratio_rows(chosen, "cpu_per_order", "(a) Redis CPU per order, 3 / 1",
                     f"≤ {CPU_PER_ORDER_MAX}"),
        ("(a) in each paired replay, lowest to highest (recorded / as at the ceiling)",
         *(f"{_spread(w['ratios'])} / {_spread(w.get('at_the_ceiling', {}).get('ratios', {}))}"
           for w in chosen), ""),
        *_ratio_rows(chosen, "measured_ceiling", "(b) ceiling, measured, 3 / 1",
                     f"≥ {CEILING_MIN}"),
        *_ratio_rows(chosen, "derived_ceiling", "(b) ceiling, derived, 3 / 1",
                     f"≥ {CEILING_MIN}"),
        ("each primary's share of the 3-primary CPU", *(_shares(w["p3"]["cpu_share"]) for w in chosen),
         ""),
        ("as at the 3-primary ceiling: the windows, times the app's; warm-up orders",
         *(_at_the_ceiling(w) for w in chosen), ""),
        ("the same: script calls per order (1 / 3 primaries)",
         *(_calls_at_the_ceiling(w) for w in chosen), ""),
        ("pipes (connections) per primary, as many for every primary (1 / 3 primaries)",
         *(f"{w['p1']['pipes']} / {w['p3']['pipes']}" for w in chosen), ""),
        ("forks inside the measured windows, every replay (1 / 3 primaries)",
         *(f"{w['p1']['forks']} / {w['p3']['forks']}" for w in chosen), ""),
        ("each primary's share of the orders' phones (3 primaries)",
         *(_shares(w["p3"].get("orders_phones_share", [])) for w in chosen), ""),
    ]  # fmt: skip
    table = "\n".join([head, rule, *(f"| {' | '.join(row)} |" for row in rows)])
    scripts = sorted(
        {name for w in chosen for n in (1, 3) for name in w[f"p{n}"]["calls_per_order_by_script"]}
    )

    def per_order(figures: dict[str, Any], name: str) -> str:
        value = figures["calls_per_order_by_script"].get(name, 0.0)
        return f"{value:.2f}" if value else "·"

    by_script = [
        f"| calls per order, by script or command (1 / 3 primaries) | {' | '.join(names)} |",
        "|---" * (len(names) + 1) + "|",
        *(
            f"| {name} | "
            + " | ".join(f"{per_order(w['p1'], name)} / {per_order(w['p3'], name)}" for w in chosen)
            + " |"
            for name in scripts
        ),
    ]
    skipped = {
        f"{name} ({n} primaries): {', '.join(f'{c} {v:.2f}' for c, v in left.items())}"
        for name, w in workloads.items()
        for n in (1, 3)
        if (left := w[f"p{n}"]["not_replayed_per_order"])
    }
    not_replayed = (
        "Sent during the orders but not replayed (no key to route them by), per order: "
        + "; ".join(sorted(skipped))
        if skipped
        else "Every command the orders sent had a key and was replayed."
    )
    return f"""### Every workload side by side (docs/escrow.md, section 9)

{table}

{chr(10).join(by_script)}

Each column is its own run of the above: both clusters flushed, the workload's phones (stock
{STOCK:,}) and customers created, its orders placed by a fresh process's order path (no
belief of an earlier run carried over), every command the service sent for them recorded
**until nothing it started was left to run** (the settler's batches, and whatever else it did
after its answers, off the request path), then replayed with each primary saturated in turn
as above (both shard counts together, in slices taken in turn, and every primary over as
many pipes: with stripe orders, one); after every replay the keys per primary must equal the recording's and the
conservation audit must hold at rest with exactly the orders the app placed. Only the
creations are replayed unmeasured. Phones and customers are drawn by a seeded generator
(the same orders on both shard counts); the partitions they land in are the app's. Where
the app has escrow's switch, every recording runs with it on (the app's default), so its grants,
refills, receipts, settles, stripe misses and saga fallbacks are all inside the measured
window, warm-up included. The rows "as at the 3-primary ceiling" are the model of the
app at its ceiling above: the orders recorded again on both shard counts with every window
of the order path that counts orders per unit of time (the settler's gather, escrow's
striping horizon, its refills' gather and demand horizon, a dry stripe's pause) stretched
as said, and, with escrow, after a warm-up of as many orders of the same draw, replayed
unmeasured with the creations. {not_replayed}
"""


def section(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """loadtests/bench.py's hook: the section, measured with its own clusters."""
    folder = out / "tier"
    names = str(getattr(args, "tier_workloads", "uniform,hot,zipf")).split(",")
    orders = getattr(args, "tier_orders", 2000)
    hot_orders = getattr(args, "tier_hot_orders", None)
    escrow = getattr(args, "tier_escrow", "auto") != "off"
    workloads = [
        workload_of(name.strip(), orders, hot_orders, escrow) for name in names if name.strip()
    ]
    result = measure(
        workloads,
        getattr(args, "tier_inflight", 32),
        getattr(args, "tier_connections", 8),
        getattr(args, "tier_replays", 5),
        getattr(args, "tier_e2e_seconds", 4),
        folder,
        hot_repeats=getattr(args, "tier_hot_replays", HOT_REPLAYS),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return {"title": TITLE, "markdown": markdown(result)}


def workload_of(name: str, orders: int, hot_orders: int | None, escrow: bool = True) -> Workload:
    """WORKLOADS[name], ``orders`` orders for ``uniform`` and ``hot_orders`` (when given)
    for the others; ``escrow`` False: escrow off for every workload."""
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}: {', '.join(WORKLOADS)}")
    workload = WORKLOADS[name]
    count = orders if name == "uniform" else hot_orders or workload.orders
    return dataclasses.replace(workload, orders=count, escrow=workload.escrow and escrow)


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose the workloads (here and in loadtests/bench.py)."""
    parser.add_argument(
        "--tier-workloads",
        default="uniform,hot,zipf",
        dest="tier_workloads",
        help=f"comma-separated, of {', '.join(WORKLOADS)} (docs/escrow.md section 9)",
    )
    parser.add_argument(
        "--tier-hot-orders",
        type=int,
        default=None,
        dest="tier_hot_orders",
        help=f"orders of each workload but uniform (default: its own, {HOT_ORDERS:,})",
    )
    parser.add_argument(
        "--tier-escrow",
        choices=("auto", "off"),
        default="auto",
        dest="tier_escrow",
        help="auto: escrow on for hot and zipf where the app has it; off: the saga alone",
    )
    parser.add_argument(
        "--tier-hot-replays",
        type=int,
        default=HOT_REPLAYS,
        dest="tier_hot_replays",
        help="replays of each workload but uniform",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_tier", description=__doc__)
    parser.add_argument("--orders", type=int, default=2000, dest="tier_orders")
    parser.add_argument("--inflight", type=int, default=32, dest="tier_inflight")
    parser.add_argument(
        "--connections", type=int, default=8, dest="tier_connections", help="pipes per primary"
    )
    parser.add_argument("--replays", type=int, default=5, dest="tier_replays")
    parser.add_argument(
        "--e2e-seconds", type=int, default=4, dest="tier_e2e_seconds", help="0: no end to end"
    )
    add_workload_options(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tier-") as tmp:
        print(section(args, Path(tmp))["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
