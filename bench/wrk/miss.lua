-- Every request a fresh Idempotency-Key: each one claims, executes and completes.
local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Write the order confirmation email"}]}'
local counter = 0

function setup(thread)
  thread:set("tid", tostring(math.random(1, 1000000000)))
end

request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/chat/completions", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer sk-bench",
    ["Idempotency-Key"] = "miss-" .. tid .. "-" .. counter,
  }, body)
end
