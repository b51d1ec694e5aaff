-- hold_entry: just before a send (with the mail's data, before its render),
-- make sure a stream entry is still pending
-- for this consumer (no other worker took it over with XAUTOCLAIM meanwhile),
-- reset its idle time so that nobody takes it over while it is being sent (the
-- send is cut off well before MAIL_CLAIM_IDLE_SECONDS), and count the attempt.
--
-- KEYS[1]  events                     stream
-- KEYS[2]  mail:attempts:{order_id}   attempt counter of the entry's mail
-- ARGV[1]  group         ("mailer")
-- ARGV[2]  consumer      this worker's name
-- ARGV[3]  entry id
-- ARGV[4]  attempt counter TTL, seconds
--
-- Returns the attempt number (>= 1) when the entry is still ours, 0 otherwise
-- (nothing written then).

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #pending == 0 then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
local attempts = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return attempts
