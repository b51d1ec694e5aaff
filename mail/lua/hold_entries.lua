-- hold_entries: just before a lane sends a chunk of mails (with their data,
-- before their render), make sure each stream entry is still pending for this
-- consumer (no other worker took it over with XAUTOCLAIM meanwhile), reset its
-- idle time so that nobody takes it over while it is being sent (the sends are
-- cut off well before MAIL_CLAIM_IDLE_SECONDS), and count the attempt. One
-- script for the whole chunk: one round trip and one AOF write, not one a mail.
--
-- KEYS[1]      e{P}                       one partition's events stream
-- KEYS[1 + i]  ma{P}<order id>            attempt counter of entry i's mail (its
--              order is of partition P: one slot)
-- ARGV[1]      group         ("mailer")
-- ARGV[2]      consumer      this worker's name
-- ARGV[3]      attempt counter TTL, seconds
-- ARGV[4]      "1": count an attempt; "0": only renew the hold (the attempt of a
--              mail held earlier and not sent yet was counted then)
-- ARGV[4 + i]  entry id i
--
-- Returns, per entry, the attempt number (>= 1) when the entry is still ours,
-- 0 otherwise (nothing written for that entry then).

local held = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local key = KEYS[i - 3]
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #pending == 0 then
    held[#held + 1] = 0
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    local attempts
    if ARGV[4] == '1' then
      attempts = redis.call('INCR', key)
      redis.call('EXPIRE', key, ARGV[3])
    else
      attempts = tonumber(redis.call('GET', key) or '1')
    end
    held[#held + 1] = attempts
  end
end
return held
