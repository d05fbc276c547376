-- bench/run's wrk script: one workload per run, chosen by environment variables.
--
--   WORKLOAD=miss    every request a fresh Idempotency-Key (claim, upstream call, record)
--   WORKLOAD=bypass  the miss requests without the header: the gateway forwards them
--                    untouched, so the row is the cost of its HTTP hop alone
--   WORKLOAD=replay  REPLAY_KEYS keys (default 100), recorded before the run by bench/run
--   WORKLOAD=join    each key used for JOIN_SIZE consecutive requests (default 8): wrk
--                    hands consecutive requests of a thread to different connections
--                    (each connection has one request in flight), so the duplicates
--                    are sent while the first is still running: they join it, or, if
--                    it already finished, replay it
--   RUN_ID           part of every key, so persistent stores (Redis, PostgreSQL) never
--                    see a key of an earlier run
--
-- The body names the key, so a cache keyed on the body (LiteLLM's) sees a miss as a miss
-- and a replay as a hit, like a cache keyed on the header does. The body must stay
-- identical to bench/run's `warm` and to loadgen's.
--
-- done() prints one machine-readable line that bench/run parses:
--   BENCH requests=N duration_us=N p50_us=N p99_us=N p999_us=N max_us=N status_errors=N socket_errors=N

local workload = os.getenv("WORKLOAD") or "miss"
local run = os.getenv("RUN_ID") or "0"
local join_size = tonumber(os.getenv("JOIN_SIZE") or "8")
local replay_keys = tonumber(os.getenv("REPLAY_KEYS") or "100")
local counter = 0
local threads = 0

-- Runs in the main Lua state once per wrk thread: gives each thread its own id (a
-- global in the thread's state), so two threads never make the same miss or join key.
function setup(thread)
  threads = threads + 1
  thread:set("tid", tostring(threads))
end

local function key()
  if workload == "replay" then
    return "r-" .. run .. "-" .. (counter % replay_keys)
  elseif workload == "join" then
    return "j-" .. run .. "-" .. tid .. "-" .. math.floor(counter / join_size)
  end
  return "m-" .. run .. "-" .. tid .. "-" .. counter
end

request = function()
  local k = key()
  counter = counter + 1
  local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench" }
  if workload ~= "bypass" then
    headers["Idempotency-Key"] = k
  end
  return wrk.format("POST", "/v1/chat/completions", headers, '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Write the order confirmation email for order ' .. k .. '"}]}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%.0f p99_us=%.0f p999_us=%.0f max_us=%.0f status_errors=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
