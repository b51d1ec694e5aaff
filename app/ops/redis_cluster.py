"""A local Redis Cluster (3 primaries + 3 replicas by default) for ``make run`` and the tests.

    python -m app.ops.redis_cluster run      # foreground; Ctrl-C or SIGTERM stops every node,
                                             # a node that dies is started again
    python -m app.ops.redis_cluster status   # one line per node with its role; exit 1 unless healthy
    python -m app.ops.redis_cluster wait     # until REDIS_CLUSTER_NODES is ok (Procfile: web, mail)

The CLI reads REDIS_CLUSTER_BASE_PORT (default 7001; nodes on BASE..BASE+5),
REDIS_CLUSTER_DIR (default var/redis-cluster), REDIS_CLUSTER_NODE_TIMEOUT_MS (default
2000) and APPENDFSYNC (default always); ``status --nodes host:port,...`` asks an
existing cluster instead (what REDIS_CLUSTER_NODES will name).

Every node is ``redis-server --cluster-enabled yes`` with AOF, ``appendfsync
always`` and ``min-replicas-to-write 1`` (when it has replicas) in its own folder
``<dir>/<port>/`` (nodes.conf, the AOF, redis.log). The
first start creates the cluster with ``redis-cli --cluster create ... --cluster-replicas
1``; a later start on the same folder lets the nodes rejoin from their nodes.conf, so
the data survives a restart. A folder holding a half-made cluster is refused with
what to do, never silently re-created.

Stdlib and redis-py only; nothing in app/ imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from app.env import env_int
from app.ops.poll import wait_until

SLOTS = 16384
HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 7001
DEFAULT_PRIMARIES = 3
DEFAULT_REPLICAS = 1
# Failure detection takes about this long, then the replica's election (docs: the
# node timeout is the main part of the failover time). Redis's own default is
# 15000; 2000 keeps a local failover to a few seconds without false alarms on a
# busy 2-core box.
DEFAULT_NODE_TIMEOUT_MS = 2000
DEFAULT_DIR = Path("var/redis-cluster")
# A replica silent this long no longer counts for min-replicas-to-write (Redis's default).
MIN_REPLICAS_MAX_LAG_S = 10
POLL_INTERVAL = 0.05


class ClusterError(RuntimeError):
    """The cluster could not be started, or is not in the shape asked for."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One line of CLUSTER NODES."""

    node_id: str
    host: str
    port: int
    role: str  # "primary" or "replica"
    primary_id: str | None
    flags: frozenset[str]
    connected: bool
    slots: tuple[tuple[int, int], ...]

    @property
    def failed(self) -> bool:
        """Marked failing by the cluster (fail) or suspected by this view (fail?)."""
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})

    @property
    def slot_count(self) -> int:
        return sum(last - first + 1 for first, last in self.slots)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_cluster_nodes(text: str) -> list[NodeInfo]:
    """CLUSTER NODES: ``<id> <ip:port@bus[,hostname]> <flags> <primary> <ping> <pong>
    <epoch> <link> <slot or range>...``; slots being migrated ("[...]") are skipped."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0]
        host, _, port = address.rpartition(":")
        flags = frozenset(parts[2].split(","))
        slots = []
        for spec in parts[8:]:
            if spec.startswith("["):
                continue
            first, _, last = spec.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            NodeInfo(
                node_id=parts[0],
                host=host,
                port=int(port) if port.isdigit() else 0,
                role="primary" if "master" in flags else "replica",
                primary_id=None if parts[3] == "-" else parts[3],
                flags=flags,
                connected=parts[7] == "connected",
                slots=tuple(slots),
            )
        )
    return nodes


@dataclass(frozen=True, slots=True)
class Topology:
    """The cluster as one node sees it."""

    nodes: tuple[NodeInfo, ...]

    def by_port(self, port: int) -> NodeInfo:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def primaries(self) -> list[NodeInfo]:
        """Primaries serving slots, not marked failing."""
        return [n for n in self.nodes if n.role == "primary" and n.slots and not n.failed]

    def replicas_of(self, primary: NodeInfo) -> list[NodeInfo]:
        return [
            n
            for n in self.nodes
            if n.role == "replica" and n.primary_id == primary.node_id and not n.failed
        ]

    def covered_slots(self) -> int:
        return sum(node.slot_count for node in self.primaries())

    def primary_for_slot(self, slot: int) -> NodeInfo:
        for node in self.primaries():
            if any(first <= slot <= last for first, last in node.slots):
                return node
        raise KeyError(slot)

    def problems(self, primaries: int, replicas: int) -> list[str]:
        """Why this is not ``primaries`` healthy primaries with ``replicas`` each and
        every slot served; empty when it is."""
        found = []
        serving = self.primaries()
        if len(serving) != primaries:
            found.append(f"{len(serving)} primaries serve slots, expected {primaries}")
        if (covered := self.covered_slots()) != SLOTS:
            found.append(f"{covered} of {SLOTS} slots served")
        for node in serving:
            if len(self.replicas_of(node)) != replicas:
                found.append(
                    f"primary {node.address} has {len(self.replicas_of(node))} replicas,"
                    f" expected {replicas}"
                )
        found += [
            f"{n.address} is marked {','.join(sorted(n.flags))}" for n in self.nodes if n.failed
        ]
        return found


def client(port: int, host: str = HOST, timeout: float = 2.0, *, retry: bool = True) -> redis.Redis:
    """A plain (not cluster-aware) client of one node, one connection. ``retry=False``:
    one attempt, for a caller that treats no answer as an answer (redis-py 8 otherwise
    retries a refused connect for about 3 s)."""
    return redis.Redis(
        host=host,
        port=port,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        single_connection_client=True,
        **({} if retry else {"retry": Retry(NoBackoff(), 0)}),
    )


def node_query(port: int, *command: str, host: str = HOST) -> str | dict | None:
    """One command on one node; None when the node does not answer, at once: make
    status reports such a node down, and the polls built on this retry by themselves."""
    try:
        with client(port, host, retry=False) as connection:
            return connection.execute_command(*command)
    except (RedisError, OSError):
        return None


def cluster_info(port: int, host: str = HOST) -> dict[str, str] | None:
    reply = node_query(port, "CLUSTER", "INFO", host=host)
    if not isinstance(reply, str):
        return None
    pairs = (line.split(":", 1) for line in reply.splitlines() if ":" in line)
    return {name: value.strip() for name, value in pairs}


def topology_from(port: int, host: str = HOST) -> Topology | None:
    reply = node_query(port, "CLUSTER", "NODES", host=host)
    return Topology(tuple(parse_cluster_nodes(reply))) if isinstance(reply, str) else None


def poll(check: Callable[[], object], timeout: float, what: str) -> object:
    """Call ``check`` until it returns something truthy; ClusterError after ``timeout``."""
    return wait_until(check, what, timeout, interval=POLL_INTERVAL, error=ClusterError)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of 127.0.0.1 that were free a moment ago (the kernel's pick)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def die_with_parent() -> None:
    """preexec_fn for the CLI: the kernel SIGTERMs a node whose runner died (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalCluster:
    """redis-server processes on ``ports`` of 127.0.0.1, one folder each under ``directory``.

    ``len(ports)`` must be a multiple of ``replicas + 1``: redis-cli makes the first
    ``len(ports) // (replicas + 1)`` nodes primaries and gives each ``replicas`` replicas.
    ``bus_ports`` set the cluster bus ports (tests pick free ones); None uses Redis's
    default, port + 10000.
    """

    directory: Path
    ports: list[int]
    bus_ports: list[int] | None = None
    replicas: int = DEFAULT_REPLICAS
    node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS
    appendfsync: str = "always"
    extra_args: tuple[str, ...] = ()
    die_with_parent: bool = False
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ports or len(self.ports) % (self.replicas + 1):
            raise ClusterError(
                f"{len(self.ports)} ports do not make primaries with {self.replicas} replicas each"
            )
        if self.bus_ports is not None and len(self.bus_ports) != len(self.ports):
            raise ClusterError("one bus port per node")

    @classmethod
    def on_base_port(
        cls,
        directory: Path,
        base_port: int,
        primaries: int = DEFAULT_PRIMARIES,
        replicas: int = DEFAULT_REPLICAS,
        **options: object,
    ) -> LocalCluster:
        count = primaries * (replicas + 1)
        return cls(directory, [base_port + i for i in range(count)], replicas=replicas, **options)  # type: ignore[arg-type]

    @classmethod
    def on_free_ports(
        cls,
        directory: Path,
        primaries: int = DEFAULT_PRIMARIES,
        replicas: int = DEFAULT_REPLICAS,
        **options: object,
    ) -> LocalCluster:
        """Node and bus ports all picked free: for tests and benchmarks beside other work."""
        count = primaries * (replicas + 1)
        ports = free_ports(2 * count)
        return cls(directory, ports[:count], bus_ports=ports[count:], replicas=replicas, **options)  # type: ignore[arg-type]

    @property
    def primaries_expected(self) -> int:
        return len(self.ports) // (self.replicas + 1)

    @property
    def startup_nodes(self) -> str:
        """``host:port,...``: what REDIS_CLUSTER_NODES names."""
        return ",".join(f"{HOST}:{port}" for port in self.ports)

    # -- processes -------------------------------------------------------------------

    def argv(self, port: int) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ClusterError("redis-server is not installed (make setup installs it)")
        argv = [
            binary,
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(self.node_dir(port)),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
            # docs/data-tier.md, section 6: a primary that lost its replica refuses
            # writes (NOREPLICAS) rather than make each one wait out WAIT for nothing.
            "--min-replicas-to-write", str(min(self.replicas, 1)),
            "--min-replicas-max-lag", str(MIN_REPLICAS_MAX_LAG_S),
            # A replica that (re)joins gets its full copy at once, not after Redis's
            # default 5 s wait for more replicas to share the transfer: there is one per
            # primary, and until it has its copy the primary refuses writes (above), so
            # the wait was most of a failover's outage (tests/test_cluster_failover.py).
            "--repl-diskless-sync-delay", "0",
            # A shard whose primary and replica are both gone stops only its own slots'
            # orders: the other shards keep serving (Redis's default stops every slot).
            "--cluster-require-full-coverage", "no",
        ]  # fmt: skip
        if self.bus_ports is not None:
            argv += ["--cluster-port", str(self.bus_ports[self.ports.index(port)])]
        return argv + list(self.extra_args)

    def node_dir(self, port: int) -> Path:
        return self.directory.resolve() / str(port)

    def start_node(self, port: int, timeout: float = 30.0) -> None:
        """Start (or restart) one node and wait until it answers PING (AOF loaded)."""
        if port in self.procs and self.procs[port].poll() is None:
            raise ClusterError(f"node {port} is already running")
        self.node_dir(port).mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            self.argv(port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent if self.die_with_parent else None,
            # Under honcho (make run) the runner's process group is signalled as a whole:
            # nodes of their own group are left for stop() to take down primaries first
            # (a primary told to stop at the same moment as its replica waits out
            # shutdown-timeout for it, and honcho kills everything at 5 s).
            start_new_session=self.die_with_parent,
        )
        proc = self.procs[port]

        def answers() -> bool:
            if proc.poll() is not None:
                log = self.node_dir(port) / "redis.log"
                tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
                raise ClusterError(f"redis-server on {port} exited with {proc.returncode}: {tail}")
            return node_query(port, "PING") is True

        poll(answers, timeout, f"redis-server on {port} to answer PING")

    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        """Signal one node and reap it (SIGKILL: the crash the fault tests need)."""
        proc = self.procs.pop(port)
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(30)

    def stop(self) -> None:
        """SIGTERM every node (Redis fsyncs and exits), SIGKILL what is left after 10 s.

        Primaries go first: on SIGTERM a primary waits up to shutdown-timeout (10 s) for its
        replicas to catch up, which is at once while they run and the full wait once they
        are gone."""
        primaries: set[int] = set()
        with contextlib.suppress(ClusterError):
            primaries = {node.port for node in self.topology().nodes if node.role == "primary"}
        first = [port for port in self.procs if port in primaries]
        for group in (first, [port for port in self.procs if port not in primaries]):
            for port in group:
                if self.procs[port].poll() is None:
                    self.procs[port].send_signal(signal.SIGTERM)
            for port in group:
                try:
                    self.procs[port].wait(10)
                except subprocess.TimeoutExpired:
                    self.procs[port].kill()
                    self.procs[port].wait()
        self.procs.clear()

    def running(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    # -- the cluster -----------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start every node, then create the cluster, or wait for it to re-form from
        the nodes' saved configuration. Stops what it started if that fails."""
        try:
            for port in self.ports:
                self.start_node(port)
            infos = {port: cluster_info(port) or {} for port in self.ports}
            known = {int(info.get("cluster_known_nodes", 0)) for info in infos.values()}
            assigned = {int(info.get("cluster_slots_assigned", 0)) for info in infos.values()}
            if known == {1} and assigned == {0}:
                self.create(timeout)
            elif known != {len(self.ports)}:
                raise ClusterError(
                    f"{self.directory} holds nodes of another or a half-made cluster"
                    f" (nodes known: {sorted(known)}). Stop it, delete {self.directory}"
                    " and start again (its data goes with it)."
                )
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def create(self, timeout: float) -> None:
        if self.primaries_expected == 1:
            self._create_single_primary(timeout)
            return
        redis_cli = shutil.which("redis-cli")
        if redis_cli is None:
            raise ClusterError("redis-cli is not installed (it comes with redis-server)")
        argv = [redis_cli, "--cluster", "create"]
        argv += [f"{HOST}:{port}" for port in self.ports]
        argv += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        (self.directory / "create.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ClusterError(
                f"redis-cli --cluster create failed: {result.stdout[-800:]}{result.stderr[-400:]}"
            )

    def _create_single_primary(self, timeout: float) -> None:
        """redis-cli --cluster create wants 3 primaries; one (the 1-shard baseline of the
        benchmarks) takes every slot itself, and its replicas meet it and follow it."""
        primary, *replicas = self.ports
        with client(primary) as node:
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, SLOTS - 1)
            primary_id = node.execute_command("CLUSTER", "MYID")
        # MEET needs the bus port when it is not port + 10000.
        bus = [] if self.bus_ports is None else [self.bus_ports[0]]
        for port in replicas:
            with client(port) as node:
                node.execute_command("CLUSTER", "MEET", HOST, primary, *bus)

        def met(port: int) -> bool:
            view = topology_from(port)
            return view is not None and any(n.node_id == primary_id for n in view.nodes)

        for port in replicas:
            poll(lambda port=port: met(port), timeout, f"{port} to meet {primary}")
            with client(port) as node:
                node.execute_command("CLUSTER", "REPLICATE", primary_id)

    def reshard(
        self,
        source_port: int,
        target_port: int,
        slots: int,
        pipeline: int = 1,
        timeout: float = 120.0,
    ) -> str:
        """Move the ``slots`` lowest slots of the primary on ``source_port`` to the one on
        ``target_port`` with ``redis-cli --cluster reshard``, keys included (MIGRATE,
        ``pipeline`` keys per call: 1 keeps each slot half-moved longest, the hardest case
        for a live client: ASK, TRYAGAIN; redis-cli's own default is 10), then wait until
        every running node sees the new owner. redis-cli takes a source's slots lowest first,
        so ``slots = 128 * n`` from a primary whose range starts at a partition's slot moves
        exactly ``n`` whole partitions (app/partitions.py: partition p is slot 128 * p).
        Returns redis-cli's output; ClusterError if it fails."""
        redis_cli = shutil.which("redis-cli")
        if redis_cli is None:
            raise ClusterError("redis-cli is not installed (it comes with redis-server)")
        view = self.topology()
        source, target = view.by_port(source_port), view.by_port(target_port)
        argv = [
            redis_cli, "--cluster", "reshard", f"{HOST}:{source_port}",
            "--cluster-from", source.node_id,
            "--cluster-to", target.node_id,
            "--cluster-slots", str(slots),
            "--cluster-pipeline", str(pipeline),
            "--cluster-yes",
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        output = result.stdout + result.stderr
        with (self.directory / "reshard.log").open("a") as log:
            log.write(output)
        if result.returncode != 0 or "[ERR]" in output:
            raise ClusterError(f"redis-cli --cluster reshard failed: {output[-800:]}")
        # The first and the last slot moved, when the source's slots were one range.
        lowest = min((first for first, _ in source.slots), default=0)

        def every_node_agrees() -> bool:
            for port in self.running():
                seen = topology_from(port)
                if seen is None:
                    return False
                try:
                    owners = {seen.primary_for_slot(s).port for s in (lowest, lowest + slots - 1)}
                except KeyError:
                    return False
                if owners != {target_port}:
                    return False
            return True

        poll(every_node_agrees, timeout, f"every node to see slots moved to {target_port}")
        return output

    def topology(self) -> Topology:
        """CLUSTER NODES as the first running node that answers sees it."""
        for port in self.running():
            found = topology_from(port)
            if found is not None:
                return found
        raise ClusterError("no node answers")

    def problems(self) -> list[str]:
        """Why the cluster is not healthy right now; empty when it is: every running
        node says cluster_state:ok and sees the full shape, every replica's link is up,
        every primary takes writes."""
        found = []
        for port in self.running():
            info = cluster_info(port)
            view = topology_from(port)
            if info is None or view is None:
                found.append(f"{port} does not answer")
                continue
            if info.get("cluster_state") != "ok":
                found.append(f"{port}: cluster_state {info.get('cluster_state')}")
            found += [
                f"{port} sees: {p}" for p in view.problems(self.primaries_expected, self.replicas)
            ]
            me = next((n for n in view.nodes if "myself" in n.flags), None)
            if me is not None and me.role == "primary" and not takes_writes(HOST, port):
                # Its replica is linked, but a primary recounts its good replicas once a
                # second: until then it still answers NOREPLICAS.
                found.append(f"{port}: refuses writes (min-replicas-to-write not met yet)")
            if me is not None and me.role == "replica":
                replication = node_query(port, "INFO", "replication")
                if (
                    not isinstance(replication, dict)
                    or replication.get("master_link_status") != "up"
                ):
                    found.append(f"{port}: replica link to its primary is not up")
        return found

    def wait_healthy(self, timeout: float = 60.0) -> None:
        last: list[str] = []

        def healthy() -> bool:
            nonlocal last
            last = self.problems()
            return not last

        try:
            poll(healthy, timeout, "the cluster to be healthy")
        except ClusterError as error:
            raise ClusterError(f"{error}: {'; '.join(last)}") from None


# -- the CLI -----------------------------------------------------------------------------


def from_env(env: Mapping[str, str]) -> LocalCluster:
    count = DEFAULT_PRIMARIES * (DEFAULT_REPLICAS + 1)
    # The bus port is port + 10000, so the base port leaves room for it.
    base = env_int(
        env, "REDIS_CLUSTER_BASE_PORT", DEFAULT_BASE_PORT, 1024, 55535 - count, error=SystemExit
    )
    appendfsync = env.get("APPENDFSYNC", "").strip() or "always"
    if appendfsync not in ("always", "everysec", "no"):
        raise SystemExit(f"APPENDFSYNC must be always, everysec or no, got {appendfsync!r}")
    return LocalCluster.on_base_port(
        Path(env.get("REDIS_CLUSTER_DIR", "").strip() or DEFAULT_DIR),
        base,
        node_timeout_ms=env_int(
            env,
            "REDIS_CLUSTER_NODE_TIMEOUT_MS",
            DEFAULT_NODE_TIMEOUT_MS,
            100,
            600_000,
            error=SystemExit,
        ),
        appendfsync=appendfsync,
    )


def describe(view: Topology) -> list[str]:
    """One line per node, primaries first, each followed by its replicas."""
    lines = []
    ordered = sorted(view.nodes, key=lambda n: (n.role != "primary", n.port))
    ports = {n.node_id: n.port for n in view.nodes}
    for node in ordered:
        state = (
            "DOWN" if node.failed or (not node.connected and "myself" not in node.flags) else "OK  "
        )
        if node.role == "primary":
            ranges = " ".join(f"{a}-{b}" if a != b else str(a) for a, b in node.slots)
            detail = f"primary  slots={node.slot_count} {ranges}".rstrip()
        else:
            detail = f"replica  of {HOST}:{ports.get(node.primary_id or '', '?')}"
        lines.append(f"{state}  {node.address:<16} {detail}  [{','.join(sorted(node.flags))}]")
    return lines


def status(seeds: list[tuple[str, int]]) -> int:
    """Print every node the first answering seed knows; 0 when the cluster is ok."""
    for host, port in seeds:
        view = topology_from(port, host)
        info = cluster_info(port, host)
        if view is None or info is None:
            print(f"DOWN  {host}:{port:<10} not answering")
            continue
        for line in describe(view):
            print(line)
        state = info.get("cluster_state", "?")
        print(
            f"cluster_state={state} slots_ok={info.get('cluster_slots_ok')} known_nodes={info.get('cluster_known_nodes')}"
        )
        return 0 if state == "ok" and not any(n.failed for n in view.nodes) else 1
    print("no node of the cluster answers")
    return 1


def takes_writes(host: str, port: int) -> bool:
    """A replica, or a primary with as many live replicas as its min-replicas-to-write
    asks (else it answers NOREPLICAS: right after the cluster forms, until they link)."""
    replication = node_query(port, "INFO", "replication", host=host)
    if not isinstance(replication, dict):
        return False
    if replication.get("role") != "master" or "min_slaves_good_slaves" not in replication:
        return True
    wanted = node_query(port, "CONFIG", "GET", "min-replicas-to-write", host=host)
    needed = int(wanted.get("min-replicas-to-write", 0)) if isinstance(wanted, dict) else 0
    return int(replication["min_slaves_good_slaves"]) >= needed


def wait_ready(seeds: list[tuple[str, int]], timeout: float) -> int:
    """Return 0 once every seed answers cluster_state:ok (what the app and the mail
    worker need before their first command: a slot map with every slot served) and
    takes writes, 1
    after ``timeout``. No seeds: 0 at once (one redis-server needs no waiting)."""

    def every_node_ok() -> bool:
        infos = [cluster_info(port, host) for host, port in seeds]
        if not all(info is not None and info.get("cluster_state") == "ok" for info in infos):
            return False
        return all(takes_writes(host, port) for host, port in seeds)

    if not seeds:
        return 0
    try:
        poll(every_node_ok, timeout, "the cluster to be ok")
    except ClusterError as error:
        print(f"[redis-cluster] {error}: {','.join(f'{h}:{p}' for h, p in seeds)}", flush=True)
        return 1
    return 0


def parse_seeds(text: str) -> list[tuple[str, int]]:
    seeds = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, _, port = item.rpartition(":")
        if not port.isdigit():
            raise SystemExit(f"want host:port,..., got {item!r}")
        seeds.append((host or HOST, int(port)))
    return seeds


def run(cluster: LocalCluster) -> int:
    """Start the cluster, print it, and keep it up until SIGINT or SIGTERM."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    cluster.die_with_parent = True
    cluster.directory.mkdir(parents=True, exist_ok=True)
    print(
        f"[redis-cluster] starting {len(cluster.ports)} nodes in {cluster.directory}/", flush=True
    )
    cluster.start()
    for line in describe(cluster.topology()):
        print(f"[redis-cluster] {line}", flush=True)
    print(f"[redis-cluster] ready: REDIS_CLUSTER_NODES={cluster.startup_nodes}", flush=True)
    # A node that exits is started again once the cluster has had time to fail over
    # (twice the node timeout): it rejoins as its heir's replica. Left down, its heir would
    # have no replica and refuse every write (min-replicas-to-write 1), so that shard
    # would stay read-only until someone restarted it by hand.
    restart_after = 2 * cluster.node_timeout_ms / 1000
    due: dict[int, float] = {}
    try:
        while not stopping.wait(0.5):
            now = time.monotonic()
            for port, proc in list(cluster.procs.items()):
                if proc.poll() is not None:
                    del cluster.procs[port]
                    due[port] = now + restart_after
                    print(
                        f"[redis-cluster] node {port} exited with {proc.returncode};"
                        f" starting it again in {restart_after:.0f} s",
                        flush=True,
                    )
            for port, when in list(due.items()):
                if now < when or stopping.is_set():
                    continue
                del due[port]
                try:
                    cluster.start_node(port)
                    print(f"[redis-cluster] node {port} is back", flush=True)
                except ClusterError as error:
                    print(f"[redis-cluster] node {port} did not come back: {error}", flush=True)
                    cluster.procs.pop(port, None)
                    due[port] = time.monotonic() + 4 * restart_after
    finally:
        print("[redis-cluster] stopping every node", flush=True)
        cluster.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.ops.redis_cluster", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start the local cluster in the foreground")
    status_parser = sub.add_parser("status", help="every node with its role; exit 1 unless ok")
    status_parser.add_argument(
        "--nodes", help="host:port,... of an existing cluster (default: the local one)"
    )
    wait_parser = sub.add_parser(
        "wait",
        help="until every node of REDIS_CLUSTER_NODES says cluster_state:ok (at once when unset)",
    )
    wait_parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(from_env(os.environ))
    if args.command == "wait":
        return wait_ready(parse_seeds(os.environ.get("REDIS_CLUSTER_NODES", "")), args.timeout)
    if args.nodes:
        seeds = parse_seeds(args.nodes)
    else:
        seeds = [(HOST, port) for port in from_env(os.environ).ports]
    return status(seeds)


if __name__ == "__main__":
    sys.exit(main())
