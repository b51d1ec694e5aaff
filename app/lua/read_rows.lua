-- read_rows: the same fields of many hashes in one call, for the audit's
-- paged recount (app/admin/audit.py). Reads only; writes nothing. One call
-- costs Redis about a microsecond per hash, so the caller keeps batches small.
--
-- KEYS[1..n]  the hashes, in the order wanted: all of one partition (the
--             audit reads one page of one partition's index per call)
-- ARGV[1..m]  the field names
--
-- Returns a flat array of n * m values: the m fields of KEYS[1], then of
-- KEYS[2], ...; nil for a missing field (a missing hash gives m nils).

local out = {}
for i = 1, #KEYS do
  local row = redis.call('HMGET', KEYS[i], unpack(ARGV))
  for j = 1, #ARGV do
    out[#out + 1] = row[j]
  end
end
return out
