-- hold_entry: before sending, make sure a stream entry is still pending for
-- this consumer (no other worker took it over with XAUTOCLAIM while it waited
-- in a long batch), and reset its idle time so nobody takes it over while it
-- is being sent.
--
-- KEYS[1]  events        stream
-- ARGV[1]  group         ("mailer")
-- ARGV[2]  consumer      this worker's name
-- ARGV[3]  entry id
--
-- Returns 1 when the entry is still ours (idle time now 0), 0 otherwise.

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #pending == 0 then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
