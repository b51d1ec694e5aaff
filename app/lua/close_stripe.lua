#!lua
-- close_stripe: a recall's second step, on one host partition S holding a stripe of
-- phone X (docs/escrow.md, section 5), with X's grants to S still in flight (drain_phone's
-- answer). Every key is S's.
--   1. Fences each grant: received when its receipt is there (gr{S}[G]: its units are in
--      the stripe), else aborted, with an abort marker ab{S}[G] that the receipt
--      (receive_grant.lua) refuses, so a grant not received now never will be.
--   2. Closes the stripe (its orders are refused from now on), bumps its epoch, and moves
--      its stock and sold units into a shipment sx{S}[R] = "X:units:sold:epoch" with
--      R = "X:S:epoch" (the old epoch: R names the phone, since sx{S} holds every phone's
--      shipments, and the take-back set rr{Q} that receives it holds order ids too),
--      due on sz{S} for the settler; stock, sold and got go to 0, and the host's ledger
--      moves by the same (stripe_units, stripe_sold_units, received_units).
-- A stripe that is closed already (a second run, or a second recall) answers the
-- shipment of its last close as it is still stored, and writes nothing but markers for
-- grants it had not been asked about; a missing stripe answers no shipment. A closed
-- stripe opens again only by a grant received after the close (receive_grant.lua), whose
-- next close ships under the next epoch.
-- Idempotent: the grants' outcomes and the shipment answered are the same every run.
--
-- KEYS[1]  sq{S}<phone_id>  hash: the stripe (stock, sold, got, epoch, closed)
-- KEYS[2]  gr{S}            hash: grant id -> units received (the receipts)
-- KEYS[3]  ab{S}            hash: id -> abort marker (the fence)
-- KEYS[4]  ad{S}            zset: id by when its marker may be pruned (ms)
-- KEYS[5]  sx{S}            hash: shipment id -> "phone_id:units:sold:epoch"
-- KEYS[6]  sz{S}            zset: shipment id by when the settler re-delivers it (ms)
-- KEYS[7]  lg{S}            hash: the host partition's ledger
-- ARGV[1]  phone id X
-- ARGV[2]  the host partition S (its number)
-- ARGV[3]  when a shipment written now is due for the settler, ms since the epoch
-- ARGV[4]  keep-until of a marker written now, ms since the epoch (app/orders/saga.py)
-- ARGV[5..]  the grant ids of X's grants to S in flight
--
-- Returns {http_status, payload_json, wrote}:
--   200, {outcomes=["received"|"aborted", ...] (one per grant id),
--         shipment_id=R, shipment="X:units:sold:epoch"}, 0|1
--        shipment_id and shipment absent when the stripe does not exist or its last
--        shipment is no longer stored (received and pruned)
--   409, {code="stripe_negative", stock, sold}, 0   a broken stripe; nothing written
--   error reply "close_stripe: ..."   bad arguments; nothing written
--
-- shipment_id, encode_shipment: the prelude (app/lua_prelude.py).

if #KEYS ~= 7 or #ARGV < 4 or not tonumber(ARGV[3]) or not tonumber(ARGV[4]) then
  return redis.error_reply('close_stripe: 7 keys, phone id, host, due, keep-until, grant ids')
end
local phone_id, host = ARGV[1], ARGV[2]
local function fmt(n)
  return string.format('%d', n)
end

local stripe = redis.call('HMGET', KEYS[1], 'stock', 'sold', 'got', 'epoch', 'closed')
local exists = redis.call('EXISTS', KEYS[1]) == 1
local stock, sold = tonumber(stripe[1] or '0'), tonumber(stripe[2] or '0')
local got, epoch = tonumber(stripe[3] or '0'), tonumber(stripe[4] or '0')
local closing = exists and not stripe[5]
if closing and (stock < 0 or sold < 0) then
  return {409, cjson.encode({code = 'stripe_negative', stock = fmt(stock), sold = fmt(sold)}), 0}
end

-- Every check passed: write.
local wrote = 0
local outcomes = {}
for i = 5, #ARGV do
  local grant_id = ARGV[i]
  if redis.call('HEXISTS', KEYS[2], grant_id) == 1 then
    outcomes[#outcomes + 1] = 'received'
  else
    if redis.call('HSETNX', KEYS[3], grant_id, 'swept') == 1 then
      redis.call('ZADD', KEYS[4], 'GT', ARGV[4], grant_id)
      wrote = 1
    end
    outcomes[#outcomes + 1] = 'aborted'
  end
end

local answer = {outcomes = outcomes}
if closing then
  local id = shipment_id(phone_id, host, fmt(epoch))
  local shipment = encode_shipment(phone_id, fmt(stock), fmt(sold), fmt(epoch))
  redis.call('HSET', KEYS[5], id, shipment)
  redis.call('ZADD', KEYS[6], 'NX', ARGV[3], id)
  redis.call('HSET', KEYS[1], 'closed', '1', 'epoch', fmt(epoch + 1), 'stock', '0', 'sold', '0',
    'got', '0')
  redis.call('HINCRBY', KEYS[7], 'stripe_units', fmt(-stock))
  redis.call('HINCRBY', KEYS[7], 'stripe_sold_units', fmt(-sold))
  redis.call('HINCRBY', KEYS[7], 'received_units', fmt(-got))
  redis.call('HINCRBY', KEYS[7], 'changes', 1)
  answer.shipment_id, answer.shipment = id, shipment
  wrote = 1
elseif exists and epoch > 0 then
  local id = shipment_id(phone_id, host, fmt(epoch - 1))
  local shipment = redis.call('HGET', KEYS[5], id)
  if shipment then
    answer.shipment_id, answer.shipment = id, shipment
  end
end
return {200, cjson.encode(answer), wrote}
