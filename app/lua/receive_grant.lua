-- receive_grant: a grant's receipt on its stripe host partition S, the grant's commit point
-- (docs/escrow.md, section 4 step 2), as commit_order.lua is an order's. A grant is a
-- reservation of k units of phone X on X's partition Q (reserve_stock.lua's grant form,
-- with the grant id G as its order id); this adds those units to X's stripe on S:
--   refused once the settler's fence aborted G (ab{S}[G], any marker): it never will be;
--   idempotent by G (gr{S}[G] holds the units received): a second run answers the first;
--   the stripe's stock and got grow by k, the host ledger's stripe_units and
--   received_units too;
--   the grant's price is taken when its generation is not older than the stripe's (units
--   are alike: the newest price wins; a late grant of an older price keeps the newer);
--   a closed stripe opens again (a grant made before the close was fenced by it, so only
--   a later one gets here); its epoch stays.
-- A new stripe starts at epoch 0 with nothing sold. The receipt's keep-until goes in
-- gd{S}, as commit_order's abort markers go in ad{P}: whoever prunes the markers prunes
-- gr{S}[G] after it (the fence must find it until the grant's reservation is settled).
-- Nothing is written before the last check.
--
-- Key names: app/keys.py; every key is in the host partition S.
-- KEYS[1]  sq{S}<phone_id>  hash, the stripe (price_cents, gen, stock, sold, got, epoch,
--                           closed)
-- KEYS[2]  lg{S}            hash, the host partition's ledger (stripe_units,
--                           received_units, changes)
-- KEYS[3]  gr{S}            hash: grant id -> units received (the receipts; the fence's
--                           test that a grant committed)
-- KEYS[4]  gd{S}            zset: grant id by when its receipt may be pruned (ms)
-- KEYS[5]  ab{S}            hash: id -> abort marker (the settler's fence; an order's or
--                           a grant's)
-- ARGV[1]  grant id G (minted in S)
-- ARGV[2]  units k (1..10^12)
-- ARGV[3]  unit price, cents, as the grant's reserve read it
-- ARGV[4]  the phone's price generation the reserve read (0 before any price change)
-- ARGV[5]  the receipt's keep-until, ms since the epoch (app/orders/saga.py: keep_until)
-- ARGV[6]  optional: the grant's expiry, ms since the epoch (its reservation's, as
--          reserve_grant recorded it in rd{Q}). Past it by Redis TIME a receipt not yet
--          made is refused, as commit_order refuses an order past its expiry: the fence's
--          marker is pruned some minutes after it was written, and a receipt arriving
--          later still (a hung app) must not add units the pool has taken back. The app's
--          grants send it (app/orders/grants.py); test fixtures may leave it out.
--
-- Returns {http_status, payload_json, received}:
--   200, {stock, got, price_cents, gen}, 1   received now
--   200, {stock, got, price_cents, gen}, 0   received before (the stripe as it is now);
--                                            nothing written
--   503, {code="service_unavailable"}, 0     the grant was fenced (aborted), or it is past
--                                            its expiry: it never will be received;
--                                            nothing written
--   error reply "receive_grant: ..."         bad arguments; nothing written
--
-- now_ms: the prelude (app/lua_prelude.py).

if #KEYS ~= 5 or (#ARGV ~= 5 and #ARGV ~= 6) or (ARGV[6] and not tonumber(ARGV[6])) then
  return redis.error_reply('receive_grant: expected 5 keys and 5 or 6 arguments')
end
local units, price, gen = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not units or units < 1 or units ~= math.floor(units) or not price or price < 0
    or not gen or gen < 0 or not tonumber(ARGV[5]) then
  return redis.error_reply('receive_grant: bad units, price, generation or keep-until')
end
local function answer(received)
  local row = redis.call('HMGET', KEYS[1], 'stock', 'got', 'price_cents', 'gen')
  return {200, cjson.encode({stock = row[1] or '0', got = row[2] or '0', price_cents = row[3] or '',
    gen = row[4] or ''}), received}
end

if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then
  return {503, cjson.encode({code = 'service_unavailable'}), 0}
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return answer(0)
end
if ARGV[6] and now_ms() > tonumber(ARGV[6]) then
  return {503, cjson.encode({code = 'service_unavailable'}), 0}
end

-- Every check passed: write.
local row = redis.call('HMGET', KEYS[1], 'gen', 'epoch', 'closed')
if not row[2] then
  redis.call('HSET', KEYS[1], 'epoch', 0, 'sold', 0)  -- a new stripe
end
if not row[1] or gen >= tonumber(row[1]) then
  redis.call('HSET', KEYS[1], 'price_cents', ARGV[3], 'gen', ARGV[4])
end
if row[3] then
  redis.call('HDEL', KEYS[1], 'closed')
end
redis.call('HINCRBY', KEYS[1], 'stock', units)
redis.call('HINCRBY', KEYS[1], 'got', units)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[4], 'GT', ARGV[5], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'stripe_units', units)
redis.call('HINCRBY', KEYS[2], 'received_units', units)
redis.call('HINCRBY', KEYS[2], 'changes', 1)
return answer(1)
