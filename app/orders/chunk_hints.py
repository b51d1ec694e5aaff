"""Each worker's belief of every partition's current status chunk (docs/data-tier.md
10.2), learnt from the placing scripts' answers.

An order id is minted for the chunk believed current (app/vocabulary.py: new_order_id)
so that the placing script's KEYS name that chunk; a script refuses a stale one, writing
nothing, and answers the current chunk, which this keeps for the next order. A wrong
belief costs a retry, never a wrong write."""

from __future__ import annotations

from app.partitions import PARTITIONS


class ChunkHints:
    def __init__(self) -> None:
        self._current = [0] * PARTITIONS

    def current(self, partition: int) -> int:
        return self._current[partition]

    def learn(self, partition: int, chunk: int) -> None:
        # As answered, even backwards (a late answer, or a fresh database): a script's
        # refusal always says the truth, so a wrong belief lasts one retry.
        self._current[partition] = chunk

    def forget(self) -> None:
        """Back to chunk 0 everywhere, as on a fresh database (whose chunks start at 0)."""
        self._current = [0] * PARTITIONS


# This worker's: every app instance in a process shares it, which only saves retries.
HINTS = ChunkHints()
