-- Fallback load script for bench/run.sh when oha is not available (wrk from Debian).
-- Environment: BENCH_BODY (request body), BENCH_HEADER (one more header), BENCH_RATE and BENCH_CONNECTIONS (optional: pace
-- each connection so the whole run approximates that total rate), BENCH_WRK_OUT (where done()
-- writes a JSON summary that bench/report.py reads).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
-- BENCH_HEADER (optional): one more header, "name: value".
local extra = os.getenv("BENCH_HEADER") or ""
local name, value = extra:match("^([^:]+):%s*(.*)$")
if name then
  wrk.headers[name] = value
end

local rate = tonumber(os.getenv("BENCH_RATE") or "")
local connections = tonumber(os.getenv("BENCH_CONNECTIONS") or "")
if rate and connections and rate > 0 then
  -- wrk has no global rate limit: each connection waits connections/rate seconds between its
  -- requests (plus the response time, so the achieved rate is slightly lower).
  local pause_ms = connections * 1000 / rate
  function delay()
    return pause_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(os.getenv("BENCH_WRK_OUT"), "w"))
  out:write(string.format(
    '{"tool":"wrk","requests":%d,"non_2xx":%d,"socket_errors":%d,"seconds":%.6f,' ..
    '"p50_us":%.1f,"p99_us":%.1f}\n',
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
    summary.duration / 1e6, latency:percentile(50), latency:percentile(99)))
  out:close()
end
