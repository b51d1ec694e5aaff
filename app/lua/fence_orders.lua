#!lua
-- fence_orders: decide the outcome of orders whose reservations outlived their expiry,
-- on the orders' own partition P (docs/data-tier.md, 3.2). For each id:
--   its proof of commit is there     -> committed (its commit ran);
--   an abort marker exists           -> aborted (a refusal, or an earlier fence);
--   neither                          -> write the abort marker "swept" -> aborted.
-- Two kinds of id, each with its proof (ARGV[2]): an order ('o'), committed when its order
-- hash o{P}<id> exists; a grant ('g', docs/escrow.md section 4: a refill of a stripe,
-- minted in the stripe's host partition S, which is then this P), committed when its
-- receipt gr{S}[id] exists (HEXISTS). The commit (commit_order; for a grant,
-- receive_grant) refuses an id with an abort marker and runs on this same partition, so
-- the fence and the commit are serialised: whichever runs first decides, and the
-- settler gives stock back only after this made the commit impossible.
-- Idempotent: a second run finds the order or the marker and answers the same.
-- A marker written here joins the pruning list until ARGV[1] (app/orders/saga.py:
-- keep_until): past it the commit refuses the order by its expiry alone.
--
-- KEYS[1]  ab{P}  hash: order id -> the refusal the commit answers (the abort markers)
-- KEYS[2]  ad{P}  zset: order id by when its marker may be pruned (ms)
-- KEYS[3..2+n]  the proof key of each id asked, same order: the order hash o{P}<id> of an
--          order, the receipts hash gr{P} of a grant
-- ARGV[1]  keep-until of a marker written now, ms since the epoch
-- ARGV[2]  the kinds: one letter per id, same order, 'o' (order) or 'g' (grant)
-- ARGV[3..2+n]  the ids
--
-- Returns {200, payload_json, wrote}:
--   200, {outcomes=["committed"|"aborted", ...] (one per id), fenced="k"}, 1|0
--        k markers written by this run; wrote = 1 when k > 0
--   error reply "fence_orders: ..."   KEYS do not fit ARGV; nothing written

local orders, kinds = #ARGV - 2, ARGV[2] or ''
if orders < 1 or #KEYS ~= 2 + orders or not tonumber(ARGV[1]) or #kinds ~= orders
    or string.find(kinds, '[^og]') then
  return redis.error_reply('fence_orders: ' .. #KEYS .. ' keys, kinds ' .. kinds .. ' for ' .. orders .. ' ids')
end
local outcomes, fenced = {}, 0
for i = 1, orders do
  local order_id = ARGV[2 + i]
  local committed
  if string.byte(kinds, i) == string.byte('g') then
    committed = redis.call('HEXISTS', KEYS[2 + i], order_id) == 1
  else
    committed = redis.call('EXISTS', KEYS[2 + i]) == 1
  end
  if committed then
    outcomes[i] = 'committed'
  else
    if redis.call('HSETNX', KEYS[1], order_id, 'swept') == 1 then
      redis.call('ZADD', KEYS[2], 'GT', ARGV[1], order_id)
      fenced = fenced + 1
    end
    outcomes[i] = 'aborted'
  end
end
return {200, cjson.encode({outcomes = outcomes, fenced = tostring(fenced)}), fenced > 0 and 1 or 0}
