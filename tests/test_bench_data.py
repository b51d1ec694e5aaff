"""The bench's bulk loader encodes commands as Redis reads them (loadtests/bench_data.py)."""

from __future__ import annotations

import socket

from loadtests.bench_data import ProtocolCommand
from loadtests.support.servers import RedisServer


def test_a_filled_command_is_the_command_redis_runs(redis_server: RedisServer) -> None:
    key = "bench-test:{hash}"  # braces in a key and in a constant must survive the template
    command = ProtocolCommand("HSET", None, "id", None, "note{x}", "braces {kept}", "seq", None)
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as conn:
        conn.sendall(command.fill(key, "p-1", "42").encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += conn.recv(64)
    assert reply == b":3\r\n"  # three new fields
    stored = redis_server.cli("HGETALL", key).splitlines()
    assert dict(zip(stored[::2], stored[1::2], strict=True)) == {
        "id": "p-1",
        "note{x}": "braces {kept}",
        "seq": "42",
    }
    redis_server.cli("DEL", key)
