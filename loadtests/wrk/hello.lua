-- wrk script: count response statuses (report.lua prints them).
--   wrk -s loadtests/wrk/hello.lua URL -- [DELAY_MS]
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

function init(args)
  statuses = {}
  delay_ms = tonumber(args[1] or "0")
  if delay_ms > 0 then
    delay = function() return delay_ms end
  end
end

function response(status, headers, body)
  count_status(status)
end
