-- Every request a fresh Idempotency-Key: each one claims, executes and completes.
local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Write the order confirmation email"}]}'
local counter = 0

-- math.random is unseeded, so its numbers repeat from run to run: the start time and
-- the thread's number keep a run's keys apart from an earlier run's on a store that
-- persists (Redis, PostgreSQL), where they would be replays.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", os.time() .. "-" .. threads)
end

request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/chat/completions", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer sk-bench",
    ["Idempotency-Key"] = "miss-" .. tid .. "-" .. counter,
  }, body)
end
