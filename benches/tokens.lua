-- wrk script for benches/run.sh: every request is a GET with `Authorization: Bearer <token>`,
-- tokens taken from a file (one per line, first script argument) in order, starting over at
-- the end. Prints one machine-readable line when the run ends (read by run.sh).
--
--   wrk -t1 -c50 -d10s -s benches/tokens.lua http://127.0.0.1:8080/ -- tokens.txt

local headers = {}
local next_index = 0

function init(args)
  local path = args[1]
  if path == nil then
    error("usage: wrk ... -s tokens.lua URL -- TOKEN_FILE")
  end
  for line in io.lines(path) do
    if #line > 0 then
      headers[#headers + 1] = "Bearer " .. line
    end
  end
  if #headers == 0 then
    error("no tokens in " .. path)
  end
end

function request()
  next_index = next_index % #headers + 1
  return wrk.format("GET", nil, { ["Authorization"] = headers[next_index] })
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
