"""Every Redis key name PhoneShop uses, and nothing else builds key strings.

Ids reach these functions only after ``app.ids`` checked them against a strict
pattern, so no caller-controlled text can widen or collide a key.

The layout (docs/data-tier.md, section 2): the data lives in 128 fixed
partitions (app/partitions.py). Every key of partition ``P`` holds its hash tag
``{T}`` (``T = PARTITION_TAGS[P]``), so on Redis Cluster all of it is one slot
and a script over one partition's keys never fails with CROSSSLOT; on one
redis-server the tags are just part of the names. An id's first byte is its
partition, so a key is built from the id alone:

* a customer and everything of its orders (the order hashes, the customer's
  indexes, its Idempotency-Key records, the partition's order indexes and
  counter, the partition's ledger) live in the customer's partition, which the
  lower-cased email chose;
* a phone, with the partition's catalogue index and counter and the phone
  side of its ledger, lives in the phone's (random) partition.

Names are short because every byte is paid per order (docs/data-tier.md,
section 10): ``c`` customer, ``k`` token, ``ce`` emails, ``cs``/``cq``
customers index and clock, ``p`` phone, ``ps``/``pq`` phones index and clock,
``o`` order, ``os``/``oq`` orders by status and their clock, ``od``/``on``/``ok``
the status chunks' directories, counts and state, ``co`` a
customer's orders by status, ``i`` Idempotency-Key record, ``lg``
ledger, ``e`` events, ``ms``/``ma``/``mr``/``md`` the confirmation mail's sent
marker, attempt counter, retry queue and dead letters. Still global:
``mail:worker:<name>:alive`` (one key, no script) and ``layout``.

Hashes and their fields (all numbers are integers, money in cents):

``c{P}<id>``      customer: id, name, surname, email, balance_cents,
                  added_cents (initial balance + deposits, ever),
                  token_sha256, seq, created_at
``p{Q}<id>``      phone: id, name, description, image_url, price_cents, stock,
                  added_units (created + restocked, ever), seq, created_at
``o{P}<id>``      order: customer_id, status (app/vocabulary.py: STATUSES),
                  items ("phone_id:quantity:unit_price_cents;...",
                  app/vocabulary.py: encode_items, decode_items),
                  total_cents, seq, created_at (the request id is in the
                  events only: the order never answers it), stored under
                  one-letter names (app/vocabulary.py: ORDER_FIELDS, the one
                  table between them and these). Not its id: the key holds
                  it, after the hash tag (the tag holds no ``}``), and every
                  reader adds it back (the Lua prelude's ``order_id_of`` and
                  ``order_map``, app/orders/service.py: order_from_hash)
``i{P}<bucket start, Unix seconds>``  the Idempotency-Key records of
                  partition P made in one time bucket: field = 16 bytes of
                  sha256(customer id, key), value = the first answer
                  (app/orders/idempotency.py); the bucket expires as a whole
``ce{P}``         lower-cased email -> customer id, for the emails of partition P

``seq`` orders every list: the script that creates a row takes it from its
partition's clock (``cq``/``pq``/``oq``: Redis TIME in microseconds, raised to
one more than the last value so it strictly grows within the partition).
Scores of different partitions compare as times, which is what lists over
all partitions merge by (app/paging.py); a tie across partitions is broken by
the partition number.

Sorted sets scored by seq: ``cs{P}`` the customers, ``ps{Q}`` the phones,
``co{P}<customer id>:<status>`` one customer's orders by status, and the
partition's orders by status in chunks (layout 7, docs/data-tier.md 10.2):
``os{P}<status>:<chunk>``. Orders enter the partition's current chunk (the
order clock ``oq{P}`` holds it beside the last seq, layout 9: ``<seq> <k> <n>``,
``k`` the chunk, ``n`` its orders so far; ``ok{P}``: ``<chunk>`` its start
seq), CHUNK_ORDERS to a chunk, so every chunk zset stays a listpack and a
chunk's seqs all precede the next one's: a partition's status list is its
chunks concatenated. An order id carries the chunk it was minted for
(app/partitions.py: chunk_of), so the scripts' KEYS name it; the order hash's
``chunk`` field says it where the two differ. ``od{P}<status>``: the non-empty
chunks scored by their start; ``on{P}<status>``: orders per chunk and per
CHUNK_GROUP chunks, for deep pages (app/status_lists.py). Every order is in
exactly one status, so there is no index of all orders (layout 5): a list of
all orders merges the status lists, which saves an entry per order.

Hash ``lg{P}``: the running totals of partition P, moved by the same script
and in the same step as the rows they sum (app/admin/audit.py checks them
against a paged recount of the rows). On a customer's partition: customers,
balance_cents (its balances), added_cents (opening balances + deposits),
orders_<status> for every status, <status>_cents and <status>_units for each
that keeps the money (app/vocabulary.py): open and completed. On a phone's
partition: phones, stock_units, added_units, held_units (reserved by the
saga), sold_units (units in open or completed orders). changes: one more for every script run that moved this
ledger, so an unchanged count means nothing of the partition moved. At every
moment, per partition: balance + open + completed = added, in cents; stock +
held + sold = added, in units. Over all partitions, at rest: the sold units = the
open + completed units.

Stream ``e{P}``: one per partition (docs/data-tier.md section 7), one entry per
change of an order of partition P, appended by the script that made the change. Fields: type (the event of the order's new status, app/vocabulary.py),
order_id, customer_id, status, request_id, at (ms since the epoch);
order.completed also carries balance_cents, the customer's balance at that
moment (for the mail). ``mail.requeued`` entries (app/admin/mail.py) put a
dead-lettered mail back: status=completed plus dead_id.

String ``layout``: the layout version of this data (LAYOUT_VERSION), written
on first start (app/layout.py).
"""

from __future__ import annotations

from app import partitions
from app.partitions import PARTITION_TAGS, partition_of

# The version of the key layout above; app/layout.py refuses data of another.
# 3: the events stream and the mail keys per partition (2 had them global).
# 4: Idempotency-Key records as fields of per-partition time buckets (3 had a hash per key).
# 5: no all-orders indexes (4 had oa{P} and co{P}<customer id> beside the status ones).
# 6: the order hash's fields under one-letter names (5 had the long ones).
# 7: a partition's orders by status in chunks of CHUNK_ORDERS (6 had one zset per status).
# 8: Idempotency-Key buckets a TTL wide (7's were a quarter of it: a lookup would miss
#    its records; app/orders/idempotency.py).
# 9: the current status chunk and its orders in the order clock oq{P} ("<seq> <k> <n>"),
#    which the placing scripts read and write anyway (8 kept them in ok{P} as k and n,
#    and its clock held the seq alone).
LAYOUT_VERSION = 9
LAYOUT = "layout"
# Keys only the previous layout (one global index per kind, one ledger) had:
# finding one without LAYOUT means data from before the partitions.
OLD_LAYOUT_KEYS = (
    "ledger",
    "phones",
    "phones:seq",
    "customers",
    "customers:seq",
    "customers:email",
    "orders",
    "orders:seq",
    "events",
    "mail:retry",
    "mail:dead",
)

MAIL_GROUP = "mailer"

# Orders placed in one chunk of a partition (docs/data-tier.md 10.2): Redis keeps a zset
# of up to 128 members (zset-max-listpack-entries, the default) a listpack.
CHUNK_ORDERS = 128
# Chunks counted together in one field of ``order_chunk_counts``.
CHUNK_GROUP = 128


def _tag(partition: int) -> str:
    return "{" + PARTITION_TAGS[partition] + "}"


def _tag_of(entity_id: str) -> str:
    return _tag(partition_of(entity_id))


# ---- a customer's partition -------------------------------------------------------------


def customer(customer_id: str) -> str:
    return f"c{_tag_of(customer_id)}{customer_id}"


def customer_token(token: str, token_sha256: str) -> str:
    """String key: sha256 of a customer's bearer token -> customer id. The token's
    first byte is its customer's partition (app/auth.py: new_token)."""
    return f"k{_tag_of(token)}{token_sha256}"


def customer_emails(partition: int) -> str:
    return f"ce{_tag(partition)}"


def customers(partition: int) -> str:
    return f"cs{_tag(partition)}"


def customers_seq(partition: int) -> str:
    return f"cq{_tag(partition)}"


def order(order_id: str) -> str:
    return f"o{_tag_of(order_id)}{order_id}"


def orders_by_status(partition: int, status: str, chunk: int) -> str:
    """Zset: the partition's orders of one status placed in one chunk, by seq (at most
    CHUNK_ORDERS members, so a listpack; docs/data-tier.md 10.2)."""
    return f"os{_tag(partition)}{status}:{chunk}"


def order_chunks(partition: int, status: str) -> str:
    """Zset: the chunk numbers whose ``orders_by_status`` is not empty, each scored by
    the seq of the first order placed in it (its chunk start)."""
    return f"od{_tag(partition)}{status}"


def order_chunk_counts(partition: int, status: str) -> str:
    """Hash: ``<chunk>`` -> its orders of that status, and ``g<group>`` -> those of
    CHUNK_GROUP chunks from ``group * CHUNK_GROUP`` on (missing: none)."""
    return f"on{_tag(partition)}{status}"


def order_chunk_state(partition: int) -> str:
    """Hash: ``<chunk>`` the seq of the first order placed in each chunk (the current
    chunk is the order clock's, ``orders_seq``)."""
    return f"ok{_tag(partition)}"


def orders_seq(partition: int) -> str:
    """String, the partition's order clock: ``<seq> <k> <n>``, the last seq given, the
    current status chunk and the orders placed in it (order_clock, order_clock_parts)."""
    return f"oq{_tag(partition)}"


def order_clock(seq: int, chunk: int, placed: int) -> str:
    """The value of ``orders_seq`` (the placing scripts' form: the prelude's
    placing_chunk and next_order_seq)."""
    return f"{seq} {chunk} {placed}"


def order_clock_parts(value: bytes | str | None) -> tuple[int, int, int]:
    """An ``orders_seq`` value as (last seq, current chunk, orders placed in it); zeros
    for a partition no order has reached. Anything but three integers is refused, as the
    placing scripts refuse it (the prelude's placing_chunk)."""
    if not value:
        return 0, 0, 0
    text = value.decode() if isinstance(value, bytes) else value
    parts = text.split()
    if len(parts) != 3:
        raise ValueError(f"order clock {text!r} is not '<seq> <chunk> <placed>'")
    seq, chunk, placed = (int(part) for part in parts)
    return seq, chunk, placed


def customer_orders_by_status(customer_id: str, status: str) -> str:
    return f"co{_tag_of(customer_id)}{customer_id}:{status}"


def idempotency_bucket(partition: int, start_s: int) -> str:
    """Hash of partition ``partition``'s Idempotency-Key records made from ``start_s`` (Unix
    seconds, a multiple of the bucket width) on: field = 16-byte digest of (customer id,
    key), value = the first answer (app/orders/idempotency.py). The bucket expires as a
    whole; the client's key is hashed so its length and characters never shape a key."""
    return f"i{_tag(partition)}{start_s}"


# SCAN/KEYS pattern matching every Idempotency-Key record (for measurements).
IDEMPOTENCY_MATCH = "i{*"


# ---- a phone's partition ----------------------------------------------------------------


def phone(phone_id: str) -> str:
    return f"p{_tag_of(phone_id)}{phone_id}"


def phones(partition: int) -> str:
    return f"ps{_tag(partition)}"


def phones_seq(partition: int) -> str:
    return f"pq{_tag(partition)}"


# ---- either -----------------------------------------------------------------------------


def ledger(partition: int) -> str:
    return f"lg{_tag(partition)}"


def events(partition: int) -> str:
    """Stream of partition ``partition``'s order events (docs/data-tier.md section 7): the
    order scripts append to their order's, the mail worker has a consumer group on each,
    the WebSocket hub reads those its sockets may see."""
    return f"e{_tag(partition)}"


def ledger_of(entity_id: str) -> str:
    """The ledger of the partition an id (customer, phone or order) lives in."""
    return ledger(partition_of(entity_id))


# ---- the confirmation mail, in its order's partition (mail/worker.py) ------------------
# With the order's events stream, so that the worker's MULTIs (sent marker + XACK,
# dead letter + XACK) and requeue_mail.lua touch one slot.


def mail_sent(order_id: str) -> str:
    """Set once the SMTP server accepted an order's confirmation mail."""
    return f"ms{_tag_of(order_id)}{order_id}"


def mail_attempts(order_id: str) -> str:
    return f"ma{_tag_of(order_id)}{order_id}"


def mail_retry(partition: int) -> str:
    """Zset: entry ids of ``events(partition)`` whose mail waits for its next attempt
    after a temporary failure, scored by when it is due (ms since the epoch). The
    entries stay pending in the ``mailer`` group, so the stream is never trimmed
    past them."""
    return f"mr{_tag(partition)}"


def mail_dead(partition: int) -> str:
    """Stream of the dead-lettered mails of partition ``partition``'s orders."""
    return f"md{_tag(partition)}"


def mail_worker_alive(worker_name: str) -> str:
    return f"mail:worker:{worker_name}:alive"


def write_ack(key: str) -> str:
    """A string in ``key``'s slot that app/cluster_gateway.py writes (with an expiry)
    to prove, with WAIT on the same connection, that a script's write on that slot
    reached the replica. Its hash tag is ``key``'s own, or ``key`` itself when it has
    none, so it lands in the same slot either way (Redis hashes only the first
    non-empty ``{...}``)."""
    start = key.find("{")
    if start < 0:
        return f"ack{{{key}}}"
    end = key.find("}", start + 1)
    if end > start + 1:
        return f"ack{{{key[start + 1 : end]}}}"
    raise ValueError(f"{key!r} has a brace but no hash tag: no ack key shares its slot")


# ---- the reservation saga (docs/data-tier.md, sections 2.3, 3 and 11) -----------------
# Each is one partition's key: ``{tag}`` puts it in that partition's one cluster slot,
# with the phone (or order) hashes its scripts touch beside it. Arguments are partition
# numbers (app.partitions.partition_of of a phone or order id).


def _in_partition(prefix: str, partition: int) -> str:
    return f"{prefix}{{{partitions.tag(partition)}}}"


def reservations(partition: int) -> str:
    """Hash: order id -> the lines a phone partition holds for it, with unit prices."""
    return _in_partition("rv", partition)


def reservations_due(partition: int) -> str:
    """Zset: order id by reservation expiry (ms), the settler's work list."""
    return _in_partition("rd", partition)


def releases(partition: int) -> str:
    """Hash: order id -> "released", the tombstone that refuses a late reserve."""
    return _in_partition("rx", partition)


def aborts(partition: int) -> str:
    """Hash on the order's partition: order id -> the abort marker, the saga's fence."""
    return _in_partition("ab", partition)


def aborts_due(partition: int) -> str:
    """Zset beside ``aborts``: order id by when its marker may go (ms; app/orders/saga.py:
    keep_until), the settler's pruning list."""
    return _in_partition("ad", partition)


def releases_due(partition: int) -> str:
    """Zset beside ``releases``: order id by when its tombstone may go (ms)."""
    return _in_partition("xd", partition)


def take_backs_due(partition: int) -> str:
    """Zset on the order's partition: cancelled order id by when its stock is due back."""
    return _in_partition("ro", partition)


def taken_back(partition: int) -> str:
    """Set on a phone partition: order ids whose stock it already took back."""
    return _in_partition("rr", partition)


def settler_lease(partition: int) -> str:
    """String: the web worker sweeping this partition's due work (SET NX PX)."""
    return _in_partition("lease", partition)


# ---- escrow: stripes of a phone's stock (docs/escrow.md, section 2) --------------------
# A stripe of phone X for primary N lives in N's host partition ``S`` (the lowest partition
# N serves), so an order whose customer is on N takes X's units there in one script. The
# pool (the phone hash's ``stock``) stays in X's own partition ``Q``. Each key below is one
# partition's, so one slot.


def stripe(host: int, phone_id: str) -> str:
    """Hash on host partition ``host``: a quota of one phone (price_cents, gen, stock, sold,
    got, epoch, closed)."""
    return f"sq{_tag(host)}{phone_id}"


def grant_receipts(host: int) -> str:
    """Hash on a host partition: grant id -> units received (the grant's commit point, and
    the fence's proof that it committed)."""
    return _in_partition("gr", host)


def grant_receipts_due(host: int) -> str:
    """Zset beside ``grant_receipts``: grant id by when its receipt may go (ms)."""
    return _in_partition("gd", host)


def shipments(host: int) -> str:
    """Hash on a host partition: shipment id -> ``phone_id:units:sold:epoch``, a closed
    stripe's units on their way home, answered again until the pool received them."""
    return _in_partition("sx", host)


def shipments_due(host: int) -> str:
    """Zset beside ``shipments``: shipment id by when the settler re-delivers it (ms)."""
    return _in_partition("sz", host)


def stripe_hosts(phone_id: str) -> str:
    """Set on the phone's partition: the host partitions holding a stripe of the phone
    (whom a recall and a price change visit)."""
    return f"sh{_tag_of(phone_id)}{phone_id}"


def grants_in_flight(phone_id: str) -> str:
    """Set on the phone's partition: ``<host>:<grant id>`` of the phone's grants not yet
    settled (what a recall must fence)."""
    return f"sg{_tag_of(phone_id)}{phone_id}"


def reprices_due(partition: int) -> str:
    """Zset on a phone partition: ``<phone_id>:<gen>`` by when a price change (to
    generation ``gen``) not yet written to every stripe is due for the settler (ms). The
    generation in the member lets a PATCH take off its own entry only, never a later
    PATCH's still in flight."""
    return _in_partition("sp", partition)


def reprice_entry(phone_id: str, gen: int | str = "") -> str:
    """A member of ``reprices_due``; without ``gen``, the prefix update_phone.lua adds the
    phone's new generation to."""
    return f"{phone_id}:{gen}"


def reprice_entry_phone(entry: str) -> str:
    """The phone id of a ``reprices_due`` member."""
    return entry.rpartition(":")[0]


def drains_due(partition: int) -> str:
    """Zset on a phone partition: phone id by when the settler finishes its recall (ms),
    for each phone whose mode is draining (docs/escrow.md, section 5): a dead app's
    recall is finished from here."""
    return _in_partition("sw", partition)
