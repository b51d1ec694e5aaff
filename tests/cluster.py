"""A real local Redis Cluster for the tests: 3 primaries + 3 replicas on free ports in a
temp folder, started and stopped with ``app.ops.redis_cluster`` (what ``make run`` will use)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.ops.redis_cluster import LocalCluster

# The fault tests wait out failure detection: shorter than make run's 2000 ms, still
# well clear of a busy shared box's pauses.
TEST_NODE_TIMEOUT_MS = 1500


def new_cluster(directory: Path, primaries: int = 3, replicas: int = 1) -> LocalCluster:
    return LocalCluster.on_free_ports(
        directory, primaries, replicas, node_timeout_ms=TEST_NODE_TIMEOUT_MS
    )


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster per test session (it takes seconds to form), for tests that leave its
    topology as they found it and their keys to themselves."""
    cluster = new_cluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of the test's own, for tests that kill or move nodes."""
    cluster = new_cluster(tmp_path / "cluster")
    cluster.start()
    yield cluster
    cluster.stop()
