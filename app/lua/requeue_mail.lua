-- requeue_mail: put a dead-lettered confirmation mail back to be sent, in one
-- step: append a fresh `mail.requeued` entry for the order to the events
-- stream (the `mailer` group reads it like order.completed; other readers
-- ignore the type), reset the order's attempt counter and delete the dead letter.
--
-- KEYS[1]  md{P}                      stream of the partition's dead letters
-- KEYS[2]  e{P}                       the partition's events stream (the mail worker consumes it)
-- KEYS[3]  ma{P}<order id>            attempt counter of that order's mail
-- (P: the order's partition, so one slot on a cluster)
-- ARGV[1]  dead letter id
-- ARGV[2]  order id the caller read from that dead letter (KEYS[3] is built from it)
-- ARGV[3]  now, ms since the epoch
-- ARGV[4]  request id (carried into the event)
--
-- Returns the new events entry id; false (nil) when the dead letter no longer
-- exists (already requeued); an error reply, with nothing written, when the
-- dead letter names another order than ARGV[2].
--
-- STATUS, pairs_to_map: the prelude (app/lua_prelude.py).

local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return false
end
local letter = pairs_to_map(found[1][2])
if letter['order_id'] ~= ARGV[2] then
  return redis.error_reply('ERR dead letter ' .. ARGV[1] .. ' is not for order ' .. ARGV[2])
end

-- XADD first: it is the only call that can fail (wrong key type), and then
-- nothing has been written yet.
local id = redis.call('XADD', KEYS[2], '*', 'type', 'mail.requeued', 'order_id', ARGV[2],
  'customer_id', letter['customer_id'] or '', 'status', STATUS.completed, 'request_id', ARGV[4],
  'at', ARGV[3], 'dead_id', ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('XDEL', KEYS[1], ARGV[1])
return id
