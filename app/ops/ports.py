"""Before ``make run`` starts anything: is every port its stack needs free?

``python -m app.ops.ports`` (run by make run after it loaded ``.env``) lists the
ports the stack is about to listen on, from the same variables and defaults
make run uses, and tries to bind each one on 127.0.0.1 the way the servers
do (SO_REUSEADDR, so a port left in TIME_WAIT by a previous run counts as
free). For every port that is taken it says which port, which variable moves
it, and what holds it when this user can see that (``/proc``), then exits 1
before honcho starts half a stack that stops at once. Stdlib only.

A system Redis is the usual culprit: Debian's ``redis-server`` package starts
one on 6379 as soon as it is installed, so make run's own redis defaults to
:data:`DEFAULTS` ``["REDIS_PORT"]`` instead.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from app.env import env_int
from app.ops.instances import instance_ports

# make run's defaults for every port it listens on (mirrored in the Makefile's
# run recipe, the Procfile and .env.example). REDIS_PORT is not 6379: that is
# where a distribution's own redis-server already listens.
DEFAULTS = {
    "REDIS_PORT": "6390",
    # REDIS_CLUSTER=1: the local cluster's first node (app/ops/redis_cluster.py).
    "REDIS_CLUSTER_BASE_PORT": "7001",
    "HTTP_PORT": "8080",
    "SEED_PHONES_PORT": "5555",
    "SEED_ORDERS_PORT": "7777",
    "SMTP_PORT": "1025",
    # The first of the mail workers' metrics ports; not checked (see needed_ports).
    "MAIL_METRICS_PORT": "9101",
}
HOST = "127.0.0.1"
# The local cluster: 3 primaries + 3 replicas.
CLUSTER_NODES = 6
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@dataclass(frozen=True)
class Need:
    """A port the stack listens on, the variable that moves it, and who listens."""

    port: int
    variable: str
    what: str


def _port(env: Mapping[str, str], name: str) -> int:
    return env_int(env, name, int(DEFAULTS[name]), 0, 65535, error=SystemExit)


def redis_ports(env: Mapping[str, str]) -> list[Need]:
    """One redis-server's port; with REDIS_CLUSTER=1 the local cluster's six nodes and
    their bus ports (+10000); none when REDIS_CLUSTER_NODES names a cluster run elsewhere."""
    if env.get("REDIS_CLUSTER", "").strip() == "1":
        base = env_int(
            env,
            "REDIS_CLUSTER_BASE_PORT",
            int(DEFAULTS["REDIS_CLUSTER_BASE_PORT"]),
            1024,
            65535 - 10_000 - CLUSTER_NODES,
            error=SystemExit,
        )
        needs = []
        for index in range(CLUSTER_NODES):
            variable = "REDIS_CLUSTER_BASE_PORT" + (f" (+{index})" if index else "")
            what = f"redis cluster node {index + 1} of {CLUSTER_NODES}"
            needs.append(Need(base + index, variable, what))
            needs.append(Need(base + index + 10_000, variable, f"{what}: its cluster bus"))
        return needs
    if env.get("REDIS_CLUSTER_NODES", "").strip():
        return []
    return [Need(_port(env, "REDIS_PORT"), "REDIS_PORT", "redis-server")]


def needed_ports(env: Mapping[str, str]) -> list[Need]:
    """Every port make run's processes listen on; a port set to 0 is off."""
    needs = redis_ports(env)
    for name, what in (
        ("HTTP_PORT", "nginx, the whole API"),
        ("SEED_PHONES_PORT", "nginx, the seed's phones service"),
        ("SEED_ORDERS_PORT", "nginx, the seed's orders service"),
    ):
        needs.append(Need(_port(env, name), name, what))
    ports = instance_ports(env)
    for index, port in enumerate(ports):
        variable = "APP_BASE_PORT" if index == 0 else f"APP_BASE_PORT (+{index})"
        needs.append(Need(port, variable, f"app instance {index + 1} of {len(ports)}"))
    if not env.get("SMTP_HOST", "").strip():
        needs.append(Need(_port(env, "SMTP_PORT"), "SMTP_PORT", "the dev SMTP sink"))
    # Not MAIL_METRICS_PORT: each mail worker takes the first free port from it
    # (mail/metrics.py), so a taken one stops nothing.
    return [need for need in needs if need.port]


def bind_error(port: int, host: str = HOST) -> OSError | None:
    """None when a server could listen on host:port now, else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as error:
            return error
    return None


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == _LISTEN
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def _pids_holding(inodes: set[str], proc: Path) -> Iterator[int]:
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in targets:
                    yield int(entry.name)
                    break
            except OSError:
                continue


def holders(port: int, proc: Path = Path("/proc")) -> list[str]:
    """'pid N: command line' of every visible process listening on the port.

    Empty when nothing listens or when the holder belongs to a user whose
    /proc entries this one cannot read.
    """
    inodes = _listening_inodes(port, proc)
    if not inodes:
        return []
    found = []
    for pid in sorted(set(_pids_holding(inodes, proc))):
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        command = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
        found.append(f"pid {pid}: {command[:120] or '?'}")
    return found


def problems(needs: list[Need]) -> list[str]:
    """One paragraph per port that is taken or asked for twice."""
    messages = []
    claimed: dict[int, Need] = {}
    for need in needs:
        if need.port in claimed:
            first = claimed[need.port]
            messages.append(
                f"port {need.port} is asked for twice: {first.variable} ({first.what}) "
                f"and {need.variable} ({need.what}); give one of them another port."
            )
            continue
        claimed[need.port] = need
        error = bind_error(need.port)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            seen = holders(need.port)
            reason = "is already in use.\n  Held by " + (
                "; ".join(seen)
                if seen
                else "a process this user cannot see "
                f"(`sudo ss -ltnp 'sport = :{need.port}'` shows it)."
            )
        else:
            reason = f"cannot be listened on: {error.strerror}."
        variable = need.variable.split(" ", 1)[0]
        messages.append(
            f"port {need.port} ({need.variable}: {need.what}) {reason}\n"
            f"  Move it: {variable}=<another port> make run, or set {variable} in .env."
        )
    return messages


def main() -> int:
    found = problems(needed_ports(os.environ))
    if not found:
        return 0
    print("make run: not starting, a port the stack needs is taken.", file=sys.stderr)
    for message in found:
        print(f"- {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
