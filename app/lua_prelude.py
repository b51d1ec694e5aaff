"""The prelude every Lua script is sent with (app/scripts.py and mail/scripts.py
put it before each), so no script copies a helper or spells a shared word:

- STATUS.<name>, ORDER_EVENT.<status>, encode_item, encode_items and
  decode_items: app/vocabulary.py in Lua;
- pairs_to_map(flat): a flat field, value, ... reply (HGETALL, a stream
  entry's fields, XINFO) as a table of field -> value;
- hgetall_map(key): the hash at key as such a table ({} when it is missing);
- order_id_of(key): the order id an order hash's key ends with (app/keys.py: order), and
  order_map(key): the order hash as a table under the long field names (ORDER_FIELD,
  app/vocabulary.py) with its ``id`` added back (the hash does not store it: the key
  holds it), and its total and creation time (order_total: the items' sum; the seq's
  millisecond) where the hash does not store them;
- now_ms(): Redis TIME in milliseconds since the epoch (redis_time: TIME read once per
  run, shared with seq_after);
- id_chunk(id): the status chunk an order id was minted for (app/partitions.py:
  chunk_of); chunk_lists(...): an order's chunk and which of the caller's status lists
  hold it; placing_chunk(...): the partition's order clock read, and the status list a
  placement goes in (nil: a stale chunk); next_order_seq(...): a placement's seq counted
  into the current chunk, the clock written once; and
  chunk_enter(...) / chunk_leave(...): an order into or out of one
  status chunk, with the chunk's directory entry and counts (app/keys.py: orders_by_status,
  order_chunks, order_chunk_counts; docs/data-tier.md 10.2);
- record_buckets(keys, newest), find_record(buckets, request), store_record(...) and
  replay_reply(status, body): the Idempotency-Key record (app/orders/idempotency.py):
  the buckets a script looks in (keys[newest], then the last OLDER_BUCKETS keys),
  the record there (nil, or: same body?, status, body), writing one, and the reply that
  replays it ({201, {"replay_of": order id}, 1} for an order, which the app rebuilds
  from the order; a refusal's stored payload as it is);
- next_seq(clock): the next ``seq`` of a partition (app/keys.py): Redis TIME in
  microseconds, or one more than the clock's last value when that is not
  later (seq_after), stored back in the clock; returned as a string of digits. It writes,
  so a script calls it only after its last check (so does next_order_seq, the orders'
  clock, which holds the chunk state too);
- short_line(key, phone_id, requested, available, lent, short): the 409 rule
  (docs/escrow.md, section 5) for a line its phone's stock cannot fill: into ``lent``
  (stock_lent) when the phone at key has units lent to stripes, else into ``short``
  (out_of_stock); place_order and reserve_stock read `lent` only then;
- end_recall(phone, drains_due, phone_id): a recall's end (docs/escrow.md, section 5);
- keys_past_the_declared(declared, argv): a script's whole KEYS when a Redis Cluster
  node runs it over several slots (``across_slots`` below).

A script gets only the definitions it names (and those they use): each costs
every run of the script a table or a closure, about 0.1 µs. They go on one
line, the script's first (after a ``#!lua`` shebang line, which Redis wants
first), so the line numbers in Redis's errors are the file's.
"""

from __future__ import annotations

import re

from app.keys import CHUNK_GROUP, CHUNK_ORDERS
from app.orders.idempotency import FIELD_BYTES, FINGERPRINT_BYTES, OLDER_BUCKETS
from app.partitions import CHUNK_CHARS, ID_ALPHABET
from app.vocabulary import lua_definitions

_FIELD, _FP = FIELD_BYTES, FINGERPRINT_BYTES

# Name -> the statement defining it; a definition comes before those that use it.
DEFINITIONS: dict[str, str] = {
    **lua_definitions(),
    "pairs_to_map": "local function pairs_to_map(flat) local map = {}"
    " for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end return map end",
    "hgetall_map": "local function hgetall_map(key)"
    " return pairs_to_map(redis.call('HGETALL', key)) end",
    # o{<tag>}<order id>: the tag holds no '}' (app/partitions.py), so the id follows the first.
    "order_id_of": "local function order_id_of(key)"
    " return string.sub(key, string.find(key, '}', 1, true) + 1) end",
    # The total and the creation time are derived where the hash does not store them
    # (layout 7 writes neither: the items sum to the one, the seq is the other's µs).
    "order_total": "local function order_total(stored, items) if stored then"
    " return tonumber(stored) end local total = 0"
    " for _, quantity, unit_price in decode_items(items) do"
    " total = total + tonumber(quantity) * tonumber(unit_price) end return total end",
    "order_map": "local function order_map(key) local stored, map = hgetall_map(key), {}"
    " for name, short in pairs(ORDER_FIELD) do map[name] = stored[short] end"
    " map.total_cents = string.format('%d', order_total(map.total_cents, map.items))"
    " map.created_at = map.created_at"
    " or string.format('%d', math.floor(tonumber(map.seq) / 1000))"
    " map.id = order_id_of(key) return map end",
    # Redis TIME, read once per run of the script (each read is a command, about as dear
    # as a small read): now_ms and seq_after of one run see one instant, which changes
    # nothing they decide (seq_after still makes seq grow past the clock's last).
    "redis_time": "local time_read local function redis_time()"
    " if not time_read then time_read = redis.call('TIME') end return time_read end",
    "now_ms": "local function now_ms() local t = redis_time()"
    " return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end",
    # The 409 rule, for a short line only: a line that fits never reads `lent`.
    "short_line": "local function short_line(key, phone_id, requested, available, lent, short)"
    " if tonumber(redis.call('HGET', key, 'lent') or '0') > 0 then lent[#lent + 1] = phone_id"
    " else short[#short + 1] = {phone_id = phone_id, requested = requested,"
    " available = available} end end",
    # A recall's end on a phone whose units are all home (drain_phone, receive_shipments):
    # pool only again, drained (the striping rule skips it until a restock: no ping-pong;
    # not when a restock came during the recall, restock.lua's `restocked`), one more
    # recall ended (a receipt whose drain read fewer is stale), off the settler's list.
    "end_recall": "local function end_recall(phone, drains_due, phone_id)"
    " redis.call('HDEL', phone, 'mode')"
    " if redis.call('HDEL', phone, 'restocked') == 0 then"
    " redis.call('HSET', phone, 'drained', 1) end"
    " redis.call('HINCRBY', phone, 'recalls', 1) redis.call('ZREM', drains_due, phone_id) end",
    # The script passes its KEYS: the one-node form (across_slots) rebuilds them as a local.
    "record_buckets": "local function record_buckets(keys, newest) local list = {keys[newest]}"
    f" for i = #keys - {OLDER_BUCKETS} + 1, #keys do list[#list + 1] = keys[i] end"
    " return list end",
    # request: the record's field then the request's fingerprint (app/orders/idempotency.py).
    "find_record": "local function find_record(buckets, request)"
    f" local field = string.sub(request, 1, {_FIELD})"
    " for _, bucket in ipairs(buckets) do local value = redis.call('HGET', bucket, field)"
    f" if value then return string.sub(value, 1, {_FP}) == string.sub(request, {_FIELD + 1}),"
    f" tonumber(string.sub(value, {_FP + 1}, {_FP + 3})), string.sub(value, {_FP + 4}) end"
    " end return nil end",
    # Every record of a bucket is given the same expiry (its window's end plus the TTL),
    # so the first one sets it: NX leaves the others' EXPIREAT unwritten (no AOF entry).
    "store_record": "local function store_record(bucket, request, status, body, expire_at)"
    f" redis.call('HSET', bucket, string.sub(request, 1, {_FIELD}),"
    f" string.sub(request, {_FIELD + 1}) .. string.format('%03d', status) .. body)"
    " redis.call('EXPIREAT', bucket, expire_at, 'NX') end",
    "replay_reply": "local function replay_reply(status, body) if status == 201 then"
    " return {201, cjson.encode({replay_of = body}), 1} end return {status, body, 1} end",
    # The placing scripts' (place_order, commit_order, place_from_stripe) shared steps.
    # The key's first answer replayed, before any other check: nil when the key has no
    # record (the request is new); a 422 when it has one for another body.
    "recorded_reply": "local function recorded_reply(buckets, request)"
    " local same_body, status, body = find_record(buckets, request)"
    " if same_body == nil then return nil end"
    " if not same_body then return {422, cjson.encode({code = 'idempotency_key_reused'}), 0} end"
    " return replay_reply(status, body) end",
    # An answer's payload encoded, and stored as the key's record when a key was given
    # (request: the record's field and fingerprint, or false): a 201's record is its id.
    "recorded_answer": "local function recorded_answer(bucket, request, expire_at, status, payload)"
    " local encoded = cjson.encode(payload)"
    " if request then store_record(bucket, request, status,"
    " status == 201 and payload.id or encoded, expire_at) end return encoded end",
    "CHUNK_ORDERS": f"local CHUNK_ORDERS = {CHUNK_ORDERS}",
    "CHUNK_GROUP": f"local CHUNK_GROUP = {CHUNK_GROUP}",
    # Characters 3..6 of the id, base64 digits (app/partitions.py: chunk_of).
    "id_chunk": "local function id_chunk(id) local n = 0"
    f" for i = {CHUNK_CHARS.start + 1}, {CHUNK_CHARS.stop} do"
    f" n = n * 64 + string.find('{ID_ALPHABET}', string.sub(id, i, i), 1, true) - 1"
    " end return n end",
    # The order's chunk (its hash's field, else its id's) as a string, and which of the
    # caller's two pairs of status lists hold it: the pair for `hinted` or for the chunk
    # after it (an order placed across a rollover); nil lists when neither, which the
    # caller refuses as order_chunk_moved before any write.
    "chunk_lists": "local function chunk_lists(stored, id, hinted, lists, next_lists)"
    " local chunk = tonumber(stored) or id_chunk(id) local name = string.format('%d', chunk)"
    " if chunk == tonumber(hinted) then return name, lists end"
    " if chunk == tonumber(hinted) + 1 then return name, next_lists end"
    " return name, nil end",
    # TIME keeps lists of different partitions in one time order; the clock
    # makes seq strictly grow within its partition even if TIME does not.
    "seq_after": "local function seq_after(last) local t = redis_time()"
    " local seq = tonumber(t[1]) * 1000000 + tonumber(t[2])"
    " if seq <= last then seq = last + 1 end return string.format('%d', seq) end",
    "next_seq": "local function next_seq(clock)"
    " local seq = seq_after(tonumber(redis.call('GET', clock) or '0'))"
    " redis.call('SET', clock, seq) return seq end",
    # The partition's order clock (app/keys.py: orders_seq, "<seq> <k> <n>": the last seq
    # given, the current chunk, the orders placed in it) read before any write, and the
    # status list a placement of chunk `chunk` goes in: `list` (the chunk's), `next_list`
    # (the chunk after it: the partition moved on while the order was on its way), or nil
    # when the current chunk is neither, which the caller refuses as order_chunk_stale.
    "placing_chunk": "local function placing_chunk(clock, chunk, list, next_list)"
    " local value, last, current, placed = redis.call('GET', clock), 0, 0, 0"
    " if value then local q, k, n = string.match(value, '^(%d+) (%d+) (%-?%d+)$')"
    " if not q then error('order clock ' .. clock .. ' holds ' .. value) end"
    " last, current, placed = tonumber(q), tonumber(k), tonumber(n) end"
    " if current == chunk + 1 then list = next_list elseif current ~= chunk then list = nil end"
    " return list, current, placed, last end",
    # A placement's seq (after the clock's last) counted into the current chunk, with
    # placing_chunk's figures: the chunk's start seq (the state hash's field <chunk>) on
    # its first order, the move to the next chunk on its last, then the clock written
    # once. Returns the seq and the current chunk after it.
    "next_order_seq": "local function next_order_seq(clock, state, last, current, placed)"
    " local seq = seq_after(last)"
    " if placed == 0 then redis.call('HSET', state, string.format('%d', current), seq) end"
    " placed = placed + 1"
    " if placed == CHUNK_ORDERS then current, placed = current + 1, 0 end"
    " redis.call('SET', clock, seq .. ' ' .. string.format('%d', current) .. ' '"
    " .. string.format('%d', placed)) return seq, current end",
    # chunk: a string of digits. The chunk's count is its status zset's size (the same
    # scripts move both), so its step to 1 or 0 says when the chunk enters its directory
    # (scored by its start, the state hash's field <chunk>) or leaves it; counts per chunk
    # and per group of chunks leave no zero behind.
    "chunk_enter": "local function chunk_enter(list, chunks, counts, state, chunk, seq, id)"
    " redis.call('ZADD', list, seq, id)"
    " if redis.call('HINCRBY', counts, chunk, 1) == 1 then"
    " redis.call('ZADD', chunks, redis.call('HGET', state, chunk), chunk) end"
    f" redis.call('HINCRBY', counts, 'g' .. math.floor(tonumber(chunk) / {CHUNK_GROUP}), 1)"
    " end",
    "chunk_leave": "local function chunk_leave(list, chunks, counts, chunk, id)"
    " redis.call('ZREM', list, id)"
    " if redis.call('HINCRBY', counts, chunk, -1) == 0 then"
    " redis.call('HDEL', counts, chunk) redis.call('ZREM', chunks, chunk) end"
    f" local group = 'g' .. math.floor(tonumber(chunk) / {CHUNK_GROUP})"
    " if redis.call('HINCRBY', counts, group, -1) == 0 then redis.call('HDEL', counts, group) end"
    " end",
    # A new order's writes once every check passed, the customer's side: the debit, the
    # order hash (under ORDER_FIELD's names, with one more field and value when given, and
    # the chunk only where the id says another), its status chunk (placing_chunk's list,
    # current, placed and last), the customer's index, the customer partition's ledger
    # and the events. Positional (no table built per order). Returns the order as
    # answered (strings, with current_chunk: the partition's after it).
    "enter_order": "local function enter_order(customer, order_key, by_customer, clock, state,"
    " chunks, counts, events, ledger, id, customer_id, items, total, units, balance,"
    " autocheck, now, request_id, list, current, placed, last, extra_field, extra_value)"
    " redis.call('HINCRBY', customer, 'balance_cents', -total)"
    " local status = STATUS.open if autocheck then status = STATUS.completed end"
    " local seq, after = next_order_seq(clock, state, last, current, placed)"
    " local order = {id = id, customer_id = customer_id, status = status, items = items,"
    " total_cents = string.format('%d', total), seq = seq,"
    " created_at = string.format('%d', math.floor(tonumber(seq) / 1000))}"
    " if extra_field then redis.call('HSET', order_key, ORDER_FIELD.customer_id, customer_id,"
    " ORDER_FIELD.status, status, ORDER_FIELD.items, items, ORDER_FIELD.seq, seq,"
    " extra_field, extra_value) else redis.call('HSET', order_key,"
    " ORDER_FIELD.customer_id, customer_id, ORDER_FIELD.status, status,"
    " ORDER_FIELD.items, items, ORDER_FIELD.seq, seq) end"
    " local chunk_name = string.format('%d', current)"
    " if current ~= id_chunk(id) then"
    " redis.call('HSET', order_key, ORDER_FIELD.chunk, chunk_name) end"
    " chunk_enter(list, chunks, counts, state, chunk_name, seq, id)"
    " redis.call('ZADD', by_customer, seq, id)"
    " redis.call('HINCRBY', ledger, 'balance_cents', -total)"
    " redis.call('HINCRBY', ledger, status .. '_cents', total)"
    " redis.call('HINCRBY', ledger, status .. '_units', units)"
    " redis.call('HINCRBY', ledger, 'orders_' .. status, 1)"
    " redis.call('HINCRBY', ledger, 'changes', 1)"
    " redis.call('XADD', events, '*', 'type', ORDER_EVENT.open, 'order_id', id,"
    " 'customer_id', customer_id, 'status', STATUS.open, 'request_id', request_id, 'at', now)"
    " if status == STATUS.completed then"
    " redis.call('XADD', events, '*', 'type', ORDER_EVENT.completed, 'order_id', id,"
    " 'customer_id', customer_id, 'status', STATUS.completed, 'request_id', request_id,"
    " 'at', now, 'balance_cents', string.format('%d', balance - total)) end"
    " order.current_chunk = string.format('%d', after) return order end",
    # ARGV[1] = u, ARGV[2..1+u] the undeclared keys, then the script's own ARGV. Each
    # undeclared key is touched first: a key this node does not serve (moved away, or
    # not yet or no longer here while its slot migrates) fails the script right there,
    # before the script's own first write, where its first write would have failed it
    # after others.
    "keys_past_the_declared": "local function keys_past_the_declared(declared, argv)"
    " local all, count = {}, tonumber(argv[1])"
    " for i = 1, #declared do all[i] = declared[i] end"
    " for i = 2, count + 1 do redis.call('EXISTS', argv[i]) all[#all + 1] = argv[i] end"
    " return all, {unpack(argv, count + 2)} end",
}

# What a script needs to run over keys of several slots of one Redis Cluster node.
ACROSS_SLOTS_SHEBANG = "#!lua flags=allow-cross-slot-keys"


# Every name in DEFINITIONS is one word (\w+), so "named as a whole word" is "one of the
# text's words": one scan of the text, not a search per name (that took about 0.2 s of
# CPU per Scripts(), that is per worker start and per test app).
_WORD = re.compile(r"\w+")


def _names_in(text: str) -> set[str]:
    return set(_WORD.findall(text)).intersection(DEFINITIONS)


def prelude_for(source: str) -> str:
    """The definitions the source names, with what they use, in one line ("" for none)."""
    wanted, todo = set(), _names_in(source)
    while todo:
        name = todo.pop()
        wanted.add(name)
        todo |= _names_in(DEFINITIONS[name]) - wanted - {name}
    return " ".join(f"{statement};" for name, statement in DEFINITIONS.items() if name in wanted)


def with_prelude(source: str) -> str:
    prelude = prelude_for(source)
    if not prelude:
        return source
    shebang = ""
    if source.startswith("#!"):
        first_line, _, source = source.partition("\n")
        shebang = first_line + "\n"
    return f"{shebang}{prelude} {source}"


def across_slots(source: str) -> str:
    """A script (without a shebang of its own) as a Redis Cluster node runs it over keys
    of several of its slots: a node answers CROSSSLOT to an EVALSHA whose declared keys
    are in more than one slot, whatever the script's flags, so only the keys of the
    first key's slot are declared and the rest come first in ARGV
    (``keys_past_the_declared``); ``allow-cross-slot-keys`` lets the script use them,
    and the node still refuses any it does not serve. The script's body is unchanged:
    ``KEYS`` and ``ARGV`` are rebuilt as locals before it, on its first line."""
    if source.startswith("#!"):
        raise ValueError("across_slots takes a script without a shebang")
    rebuilt = "local KEYS, ARGV = keys_past_the_declared(KEYS, ARGV) "
    return with_prelude(f"{ACROSS_SLOTS_SHEBANG}\n{rebuilt}{source}")
