-- wrk script for scripts/loadgen.py's `drive_wrk`: each wrk thread has one connection and posts its
-- lane's prepared requests in order, once each, then writes what it got and stops.
--
--   wrk -t N -c N -s scripts/wrk_lanes.lua URL -- DIR EXPECT
--
-- DIR/lane-<i> holds lane i's raw HTTP requests, each ended by a NUL byte (JSON bodies and headers
-- never hold one). Thread i writes DIR/result-<i>: one line per answer with the expected status
-- ("ok <seconds> <body>"), one per other answer ("error <status> <body>"), then "resent <n>". A
-- request whose connection was lost before its answer is sent again as it was (wrk itself would go on
-- to the next one, out of order); a lane that still does not finish writes nothing, and loadgen counts
-- its requests as errors.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } loadgen_timespec;
int clock_gettime(int clock, loadgen_timespec *tp);
]]
local clock = ffi.new("loadgen_timespec")
local function monotonic()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end

local lanes = 0
function setup(thread)
  thread:set("lane", lanes)
  lanes = lanes + 1
end

function init(args)
  dir, expect = args[1], tonumber(args[2])
  local file = assert(io.open(dir .. "/lane-" .. lane, "rb"))
  local data = file:read("*a")
  file:close()
  requests = {}
  for one in string.gmatch(data, "([^%z]+)%z") do
    requests[#requests + 1] = one
  end
  sent, results, started, awaiting, resent = 0, {}, 0, false, 0
end

function request()
  if awaiting then
    resent = resent + 1 -- wrk reconnected: the last request had no answer
  else
    sent = sent + 1
  end
  awaiting = true
  started = monotonic()
  return requests[math.min(sent, #requests)]
end

function response(status, headers, body)
  awaiting = false
  local line
  if status == expect then
    line = string.format("ok %.6f %s", monotonic() - started, (body:gsub("\n", " ")))
  else
    line = string.format("error %d %s", status, (body:sub(1, 300):gsub("\n", " ")))
  end
  results[#results + 1] = line
  if #results == #requests then
    local file = assert(io.open(dir .. "/result-" .. lane, "wb"))
    file:write(table.concat(results, "\n"), "\nresent ", resent, "\n")
    file:close()
    wrk.thread:stop()
  end
end
