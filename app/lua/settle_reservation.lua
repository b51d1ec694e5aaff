#!lua
-- settle_reservation: the saga's confirm or cancel step on one phone partition Q
-- (docs/data-tier.md, 3.1 and 3.2) for one or several orders whose outcome is known (the
-- commit's answer, or the fence's on the order's partition). Several in one call because
-- a call costs Redis about as much as the work of settling one order (section 9): the
-- order path settles every order of an event-loop tick together, the settler a sweep's.
--   committed: the reserved units move from held to sold; the reservation goes.
--   aborted:   they move from held back to stock; the reservation goes, and a release
--              tombstone stays, so a reserve arriving late for this order is refused
--              (it is written even when there was no reservation here: that late
--              reserve is exactly the one that would find none). The tombstone joins
--              the pruning list until the keep-until time: past it the reserve refuses
--              the order by its expiry alone (app/orders/saga.py: keep_until).
-- A grant's reservation (docs/escrow.md, section 4: "g <host> <gen> " and its one line,
-- app/vocabulary.py: encode_grant) settles the same way, but committed (its receipt is
-- on the host) moves held to lent, not sold, and either outcome takes "<host>:<grant id>"
-- out of the phone's grants in flight: the grant is no longer in flight.
-- Idempotent by order id: a second run finds no reservation and moves nothing (an
-- abort rewrites the same tombstone), so a retried call answers settled = "0"; an order
-- named twice in one call is settled once.
-- An order whose stored reservation is not the lines its caller read is left as it is
-- and answered reservation_changed (the caller settles it again with the stored lines).
-- Nothing is written before the last check of the whole call.
--
-- KEYS[1]  rv{Q}  hash: order id -> reserved lines
-- KEYS[2]  rd{Q}  zset: order id by expiry
-- KEYS[3]  rx{Q}  hash: order id -> released
-- KEYS[4]  lg{Q}  hash: the partition's ledger (stock_units, held_units, sold_units,
--          lent_units, changes)
-- KEYS[5]  xd{Q}  zset: order id by when its release tombstone may be pruned (ms)
-- KEYS[6..]  for each order in turn, the phone hash of each line of ITS ARGV lines, and
--          for a grant after its one line's phone: sg{Q}<phone_id>, its grants in flight
-- ARGV[3i-2], ARGV[3i-1], ARGV[3i]  for order i: its id, "committed" or "aborted", and the
--          reservation as the caller read it (rv{Q}[id], a grant's with its head), or ""
--          when it found none; that order's phone keys were built from them
-- ARGV[#ARGV]  keep-until of a tombstone written now, ms since the epoch
--
-- Returns {http_status, payload_json, settled}:
--   200, {results=[...]} one per order, in order, each
--          {outcome, settled="1"}          the units moved now
--          {outcome, settled="0"}          no reservation (settled before, or named
--                                          earlier in this call); an abort (re)wrote
--                                          the tombstone
--          {code="reservation_changed", lines}   left as it is
--        settled = 1 when any order's units moved
--   409, {code="held_short", phone_id, held, quantity}, 0   a phone holds fewer units
--        than the reservations to settle (a broken invariant); nothing written
--   error reply "settle_reservation: ..."  bad outcome or KEYS do not fit; nothing written
--
-- decode_items, decode_grant, grant_in_flight: the prelude (app/lua_prelude.py).

local orders = (#ARGV - 1) / 3
local keep_until = tonumber(ARGV[#ARGV])
if orders < 1 or orders ~= math.floor(orders) or not keep_until then
  return redis.error_reply('settle_reservation: ARGV must be order, outcome, lines triples and a keep-until')
end

-- Check every order and add up what each phone must hold, before any write.
local plans, need, phone_of, next_key, seen = {}, {}, {}, 6, {}
for i = 1, orders do
  local order_id, outcome, caller_lines = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if outcome ~= 'committed' and outcome ~= 'aborted' then
    return redis.error_reply('settle_reservation: outcome must be committed or aborted')
  end
  local plan = {order_id = order_id, outcome = outcome, lines = {}}
  local host, _, grant_lines = decode_grant(caller_lines)
  for phone_id, quantity in decode_items(grant_lines or caller_lines) do
    if not KEYS[next_key] then
      return redis.error_reply('settle_reservation: too few keys for the lines')
    end
    plan.lines[#plan.lines + 1] = {phone_id, tonumber(quantity), KEYS[next_key]}
    next_key = next_key + 1
  end
  if host then
    if #plan.lines ~= 1 or not KEYS[next_key] then
      return redis.error_reply('settle_reservation: a grant is one line and its grants in flight')
    end
    plan.in_flight, plan.grant = KEYS[next_key], grant_in_flight(host, order_id)
    next_key = next_key + 1
  end
  local stored = redis.call('HGET', KEYS[1], order_id)
  if seen[order_id] then
    plan.result = {outcome = outcome, settled = '0'}
  elseif (stored or '') ~= caller_lines then
    plan.result = {code = 'reservation_changed', lines = stored or ''}
  elseif not stored then
    plan.result = {outcome = outcome, settled = '0'}
  else
    plan.moves = true
    for _, line in ipairs(plan.lines) do
      need[line[3]] = (need[line[3]] or 0) + line[2]
      phone_of[line[3]] = line[1]
    end
  end
  seen[order_id] = true
  plans[i] = plan
end
if next_key ~= #KEYS + 1 then
  return redis.error_reply('settle_reservation: ' .. #KEYS .. ' keys for ' .. (next_key - 1))
end
for key, quantity in pairs(need) do
  local held = tonumber(redis.call('HGET', key, 'held') or '0')
  if held < quantity then
    return {409, cjson.encode({code = 'held_short', phone_id = phone_of[key], held = tostring(held),
      quantity = tostring(quantity)}), 0}
  end
end

-- Every check passed: write.
local results, moved = {}, {committed = 0, aborted = 0, lent = 0}
for i, plan in ipairs(plans) do
  local changed = plan.result and plan.result.code
  if plan.outcome == 'aborted' and not changed then
    redis.call('HSET', KEYS[3], plan.order_id, 'released')
    redis.call('ZADD', KEYS[5], 'GT', keep_until, plan.order_id)
  end
  if plan.moves then
    local target = plan.outcome == 'committed' and (plan.grant and 'lent' or 'sold') or 'stock'
    for _, line in ipairs(plan.lines) do
      redis.call('HINCRBY', line[3], 'held', -line[2])
      redis.call('HINCRBY', line[3], target, line[2])
      moved[plan.outcome] = moved[plan.outcome] + line[2]
      if target == 'lent' then
        moved.lent = moved.lent + line[2]
      end
    end
    if plan.grant then
      redis.call('SREM', plan.in_flight, plan.grant)
    end
    redis.call('HDEL', KEYS[1], plan.order_id)
    redis.call('ZREM', KEYS[2], plan.order_id)
    plan.result = {outcome = plan.outcome, settled = '1'}
  end
  results[i] = plan.result
end
local units = moved.committed + moved.aborted
if units > 0 then
  redis.call('HINCRBY', KEYS[4], 'held_units', -units)
  if moved.committed > moved.lent then
    redis.call('HINCRBY', KEYS[4], 'sold_units', moved.committed - moved.lent)
  end
  if moved.lent > 0 then
    redis.call('HINCRBY', KEYS[4], 'lent_units', moved.lent)
  end
  if moved.aborted > 0 then
    redis.call('HINCRBY', KEYS[4], 'stock_units', moved.aborted)
  end
  redis.call('HINCRBY', KEYS[4], 'changes', 1)
end
return {200, cjson.encode({results = results}), units > 0 and 1 or 0}
