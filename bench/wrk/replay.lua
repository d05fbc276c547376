-- 100 keys, recorded before the run (bench/gateway warms them): every request a replay.
local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Write the order confirmation email"}]}'
local counter = 0

request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/chat/completions", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer sk-bench",
    ["Idempotency-Key"] = "replay-" .. (counter % 100),
  }, body)
end
