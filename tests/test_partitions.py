"""app/partitions.py: the partition tags and ids of docs/data-tier.md section 2 (pure
computation; tests/test_cluster.py checks the tags against a real cluster)."""

from __future__ import annotations

import itertools
import string

import pytest
from redis.crc import key_slot

from app import ids, partitions


def test_every_tag_is_the_first_string_that_lands_in_its_slot() -> None:
    alphabet = string.ascii_letters + string.digits
    wanted = {partitions.slot(p): p for p in range(partitions.PARTITIONS)}
    first: dict[int, str] = {}
    for length in (1, 2, 3):
        for letters in itertools.product(alphabet, repeat=length):
            candidate = "".join(letters)
            found = wanted.get(key_slot(candidate.encode()))
            if found is not None and found not in first:
                first[found] = candidate
    assert tuple(first[p] for p in range(partitions.PARTITIONS)) == partitions.PARTITION_TAGS


def test_a_key_holding_a_tag_lives_in_its_partitions_slot() -> None:
    for p in range(partitions.PARTITIONS):
        key = f"o{{{partitions.tag(p)}}}\x00\xff-rest".encode("latin-1")
        assert key_slot(key) == p * 128


@pytest.mark.parametrize("partition", [0, 1, 63, 64, 127])
def test_a_new_id_is_a_valid_id_that_names_its_partition(partition: int) -> None:
    for _ in range(200):
        entity_id = partitions.new_id(partition)
        assert ids.is_valid_id(entity_id)
        assert partitions.partition_of(entity_id) == partition


def test_every_partition_can_be_minted_and_read_back() -> None:
    assert [
        partitions.partition_of(partitions.new_id(p)) for p in range(partitions.PARTITIONS)
    ] == list(range(partitions.PARTITIONS))
    with pytest.raises(ValueError):
        partitions.new_id(partitions.PARTITIONS)


def test_any_valid_id_maps_to_a_partition_and_random_ids_spread() -> None:
    seen = {partitions.partition_of(ids.new_id()) for _ in range(5000)}
    # 5000 random ids over 128 partitions miss one with probability below 128 * e^-39.
    assert seen == set(range(partitions.PARTITIONS))
    assert partitions.partition_of("A" * 22) == 0
    assert partitions.partition_of("_" * 22) == 127


def test_an_email_always_picks_the_same_partition() -> None:
    chosen = partitions.partition_for_email("ada@example.com")
    assert chosen == partitions.partition_for_email("ada@example.com")
    assert 0 <= chosen < partitions.PARTITIONS
    spread = {partitions.partition_for_email(f"user{n}@example.com") for n in range(5000)}
    assert spread == set(range(partitions.PARTITIONS))


@pytest.mark.parametrize("chunk", [0, 1, 127, 128, 4095, 64**4 - 1])
def test_an_order_id_carries_its_partition_and_its_chunk(chunk: int) -> None:
    """Characters 3..6 say the chunk (what the scripts' id_chunk reads); the id stays a
    valid id of its partition, and 96 bits stay random (no two alike here)."""
    minted = {partitions.new_chunked_id(p, chunk) for p in range(partitions.PARTITIONS)}
    minted |= {partitions.new_chunked_id(7, chunk) for _ in range(200)}
    assert len(minted) == partitions.PARTITIONS + 200
    for order_id in minted:
        assert ids.is_valid_id(order_id)
        assert partitions.chunk_of(order_id) == chunk
    assert sorted({partitions.partition_of(o) for o in minted}) == list(
        range(partitions.PARTITIONS)
    )


def test_a_chunk_past_24_bits_is_refused() -> None:
    with pytest.raises(ValueError):
        partitions.new_chunked_id(0, 64**4)
