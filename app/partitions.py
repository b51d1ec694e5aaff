"""The data tier's fixed logical partitions (docs/data-tier.md, section 2).

app/keys.py builds every key name on them; app/vocabulary.py says which partition each
kind of id is minted in.

* There are 128 partitions, fixed for a data directory. Partition ``p`` owns exactly one
  Redis Cluster slot, ``128 * p``, through its hash tag ``PARTITION_TAGS[p]``: every key
  holding ``{tag}`` lives there, so resharding moves whole partitions and code never changes.
* An id is 16 bytes in URL-safe base64 (22 characters, ``app/ids.py``'s pattern) whose first
  byte is its partition; ``partition_of`` reads it from the first two characters, so routing
  never needs a lookup.
* An order id also carries its status chunk (docs/data-tier.md, 10.2) in characters 3..6
  (bits 12..35, 24 bits: ``chunk_of``), so a script's KEYS can name the chunk before it
  runs; 96 bits stay random.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import secrets

PARTITIONS = 128
SLOTS = 16384
SLOTS_PER_PARTITION = SLOTS // PARTITIONS

# PARTITION_TAGS[p]: the first alphanumeric string (by length, then in the order of
# string.ascii_letters + string.digits) whose CRC16 slot is 128 * p. tests/test_partitions.py
# recomputes every one.
# fmt: off
PARTITION_TAGS = (
    "fHh", "cMO", "nbd", "jwb", "fJH", "cOo", "ope", "aL9", "dlj", "aiM", "lFf", "aJY", "Bh", "akm", "g95", "aHy",
    "bDe", "fQc", "bgq", "dR5", "bFE", "fSC", "aU2", "fpW", "apF", "YC", "aSR", "zW", "arf", "dwA", "aQr", "xw",
    "fYj", "bLl", "nsf", "box", "gKk", "bNL", "06", "bmX", "QJ", "axO", "6V", "bk8", "Sj", "azo", "4v", "cy9",
    "bUg", "nIy", "bvs", "dC7", "bWG", "fBA", "aD0", "m5", "aaD", "HA", "aBP", "kU", "acd", "Ja", "hYI", "iu",
    "fjl", "coK", "fIx", "jUf", "fhL", "b9B", "G8", "jWF", "bL", "aKI", "AX", "hqd", "dLN", "aIi", "Cx", "hsD",
    "bfa", "fsg", "bEu", "dp1", "bdA", "fqG", "aw6", "eb0", "aRB", "dWe", "aqV", "XS", "aPb", "yg", "asv", "Zs",
    "gkO", "bnh", "dx8", "jDd", "fyN", "blH", "ej9", "jFD", "sN", "aZK", "PZ", "ipG", "qn", "aXk", "Rz", "hbF",
    "bwc", "fbe", "bTw", "da3", "buC", "gpd", "af4", "O1", "hZy", "jE", "bP7", "IQ", "hXY", "he", "abt", "Kq",
)
# fmt: on

# URL-safe base64's digits in value order: an id's characters (app/ids.py).
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64 = {c: i for i, c in enumerate(ID_ALPHABET)}


def tag(partition: int) -> str:
    return PARTITION_TAGS[partition]


def slot(partition: int) -> int:
    """The one cluster slot partition ``partition`` lives in."""
    return partition * SLOTS_PER_PARTITION


def partition_of(entity_id: str) -> int:
    """The partition an id (already checked against app/ids.py's pattern) names: the low
    7 bits of its first byte, which its first two base64 characters carry."""
    first_byte = (_B64[entity_id[0]] << 2) | (_B64[entity_id[1]] >> 4)
    return first_byte & (PARTITIONS - 1)


def new_id(partition: int) -> str:
    """A random id in ``partition``: 15 random bytes after the partition byte."""
    if not 0 <= partition < PARTITIONS:
        raise ValueError(f"no partition {partition}")
    raw = bytes([partition]) + secrets.token_bytes(15)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# An order id's chunk: 4 base64 characters from the third on, whole characters so that Lua
# reads it as plainly (app/lua_prelude.py: id_chunk). The second character's low 4 bits and
# everything after the sixth stay random: 4 + 92 = 96 random bits.
CHUNK_CHARS = slice(2, 6)
CHUNK_LIMIT = 64**4


def new_chunked_id(partition: int, chunk: int) -> str:
    """A random id in ``partition`` whose characters 3..6 say ``chunk``."""
    text = new_id(partition)
    return text[: CHUNK_CHARS.start] + _chunk_digits(chunk) + text[CHUNK_CHARS.stop :]


# Every order of a chunk is minted with the same 4 digits: spelt once per chunk (P1).
@functools.lru_cache(maxsize=4096)
def _chunk_digits(chunk: int) -> str:
    if not 0 <= chunk < CHUNK_LIMIT:
        raise ValueError(f"no chunk {chunk}")
    return "".join(ID_ALPHABET[(chunk >> shift) & 63] for shift in (18, 12, 6, 0))


def chunk_of(entity_id: str) -> int:
    """The chunk an order id (already checked against app/ids.py's pattern) was minted for."""
    value = 0
    for char in entity_id[CHUNK_CHARS]:
        value = value * 64 + _B64[char]
    return value


def partition_for_email(email_lower: str) -> int:
    """A customer's partition: from the lower-cased email, so the email's uniqueness index
    and the customer live in one partition and creating a customer stays one script."""
    return hashlib.sha256(email_lower.encode()).digest()[0] & (PARTITIONS - 1)
