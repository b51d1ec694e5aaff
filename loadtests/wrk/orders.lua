-- wrk script: POST /orders, each request with its own Idempotency-Key and a
-- customer's bearer token taken round-robin. loadtests/bench.py writes the
-- data file it loads (tokens and phone ids) and passes its path as the
-- first script argument:
--   wrk -s loadtests/wrk/orders.lua URL -- DATA_FILE NONCE [DELAY_MS]
-- The response status of every request is counted per thread; done() prints
-- one JSON line "wrk-statuses {...}" that bench.py parses.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  local data = dofile(args[1])
  tokens = data.tokens
  phones = data.phones
  delay_ms = tonumber(args[3] or "0")
  statuses = {}
  -- args[2]: a nonce bench.py makes per wrk run, so no two runs share a key.
  prefix = string.format("wrk-%s-%d-", args[2], id)
  if delay_ms > 0 then
    -- wrk looks for delay() after init: define it only when pacing.
    delay = function() return delay_ms end
  end
end

function request()
  counter = counter + 1
  local token = tokens[(counter + id * 7919) % #tokens + 1]
  local phone = phones[(counter * 31 + id) % #phones + 1]
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }
  local body = '{"items":[{"phone_id":"' .. phone .. '","quantity":1}]}'
  return wrk.format("POST", "/orders", headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    for status, n in pairs(counts) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  io.write("wrk-statuses {" .. table.concat(parts, ", ") .. "}\n")
  -- Latency percentiles in microseconds (wrk's --latency has no p95).
  io.write(string.format('wrk-latency {"p50": %d, "p95": %d, "p99": %d}\n',
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
