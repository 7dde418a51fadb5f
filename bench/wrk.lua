-- bench/run.py's wrk script: cycles through the requests of a data file, one per line
-- (METHOD <tab> PATH <tab> TOKEN <tab> BODY), and measures the longest time without a response.
--
--   wrk -t1 -c32 -d10s -s bench/wrk.lua http://127.0.0.1:PORT -- <data file> <progress_every>
--
-- With progress_every > 0 it prints "PROGRESS <responses>" that often (run.py interrupts wrk after a
-- number of requests); at the end one line "BENCHJSON {...}" with the counts and percentiles.
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long s; long ns; } bench_timespec; int clock_gettime(int, bench_timespec *); ]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.s) * 1000 + tonumber(ts.ns) / 1e6
end
local reqs, n, i = {}, 0, 0
local progress_every = 0
-- globals, read by done() through thread:get()
started_ms, last_ms, max_gap_ms, responses = 0, 0, 0, 0

function init(args)
  -- args[0] is the URL; what follows "--" on wrk's command line is args[1], args[2]...
  local data = assert(args[1], "usage: wrk ... -s bench/wrk.lua URL -- <data file> [progress_every]")
  progress_every = tonumber(args[2] or "0")
  for line in io.lines(data) do
    local m, p, tok, body = line:match("^(%u+)\t([^\t]+)\t([^\t]*)\t(.*)$")
    local headers = {["Authorization"] = "Bearer " .. tok}
    if body == "" then
      body = nil
    else
      headers["Content-Type"] = "application/json"
    end
    n = n + 1
    reqs[n] = wrk.format(m, p, headers, body)
  end
  started_ms = now_ms()
  last_ms = started_ms
end

function request()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end

function response(status, headers, body)
  local now = now_ms()
  if now - last_ms > max_gap_ms then max_gap_ms = now - last_ms end
  last_ms = now
  responses = responses + 1
  if progress_every > 0 and responses % progress_every == 0 then
    io.write("PROGRESS " .. responses .. "\n")
    io.flush()
  end
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local t = threads[1]
  local trailing = summary.duration / 1000 - (t:get("last_ms") - t:get("started_ms"))
  local gap = math.max(t:get("max_gap_ms"), trailing)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f, "max_gap_ms": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean, gap))
end
