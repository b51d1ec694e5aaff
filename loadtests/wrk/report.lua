-- What every wrk script here reports, loaded by each with dofile: the response
-- statuses its threads counted (one line "wrk-statuses {...}") and the latency
-- percentiles in microseconds ("wrk-latency {...}"; wrk's --latency has no p95),
-- which loadtests/bench_drivers.py parses. Each thread gets an "id": 1, 2, ...
-- A script's init sets `statuses = {}` (or calls load_orders_data) and its
-- response() calls count_status.
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

-- The prologue of orders.lua and cancels.lua: args[1] is the data file bench.py
-- writes (tokens and phone ids), args[2] a nonce it makes per wrk run, so no two
-- runs share an Idempotency-Key; each key starts with `prefix`.
function load_orders_data(args)
  local data = dofile(args[1])
  tokens = data.tokens
  phones = data.phones
  statuses = {}
  prefix = string.format("wrk-%s-%d-", args[2], id)
end

function count_status(status)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  io.write("wrk-statuses {" .. table.concat(parts, ", ") .. "}\n")
  io.write(string.format('wrk-latency {"p50": %d, "p95": %d, "p99": %d}\n',
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
