//! The Lua scripts: every state change is one script, so that the check and the write
//! are one atomic step on the server (never a read followed by an unconditional
//! write), and every time is the server's (`TIME`).
//!
//! Record hash (`{p:k}:rec`): `state` (`flight` or `done`), `fp` (32 raw bytes),
//! `token` (the UUID text of the claim's token; kept after `complete`, so the owner's
//! live log can still take its last chunks), `created_at`, `lease_until` (in flight
//! only), `expires_at` (completed only), `response` (the `StoredResponse::encode`
//! bytes). Times are unix milliseconds as decimal text.
//!
//! Live log: a hash `{p:k}:live` (`token`, `head`, `end`) and a list `{p:k}:chunks`.
//!
//! A script answers a fence that does not hold with `0` (or nil) and changes nothing;
//! a record it cannot read with an `IDEMGATE` error.

use std::sync::LazyLock;

use redis::Script;

/// Shared by every script: the server's clock in milliseconds, and integers written
/// as decimal text (Lua would print large numbers in exponent form).
const PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x)
  return string.format('%d', x)
end
-- A relative expiry in milliseconds, at least 1 and at most about a century.
local function keep(ms)
  if ms < 1 then return '1' end
  if ms > 3153600000000 then return '3153600000000' end
  return int(ms)
end
";

/// `decide` from `idemgate::store`, atomically.
///
/// KEYS: rec. ARGV: fingerprint, new token, lease ms, in-flight grace ms.
/// Answers `{'acquired', lease_until, took_over}`, `{'in_flight', lease_until}`,
/// `{'completed', response}` or `{'mismatch'}`.
const CLAIM: &str = r"
local now = now_ms()
local r = redis.call('HMGET', KEYS[1], 'state', 'fp', 'lease_until', 'expires_at')
local took_over = 0
if r[1] == 'done' then
  local expires_at = tonumber(r[4])
  if not expires_at then return redis.error_reply('IDEMGATE completed record has no expires_at') end
  if expires_at > now then
    if r[2] ~= ARGV[1] then return {'mismatch'} end
    local response = redis.call('HGET', KEYS[1], 'response')
    if not response then return redis.error_reply('IDEMGATE completed record has no response') end
    return {'completed', response}
  end
elseif r[1] == 'flight' then
  if r[2] ~= ARGV[1] then return {'mismatch'} end
  local lease_until = tonumber(r[3])
  if not lease_until then return redis.error_reply('IDEMGATE in-flight record has no lease_until') end
  if lease_until > now then return {'in_flight', lease_until} end
  -- The lease ran out: take it over. Within this script nothing can come between the
  -- read of the stale token above and this write, so exactly one claimer wins.
  took_over = 1
elseif r[1] then
  return redis.error_reply('IDEMGATE record has an unknown state')
end
local lease_ms = tonumber(ARGV[3])
local lease_until = now + lease_ms
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'flight', 'fp', ARGV[1], 'token', ARGV[2],
  'lease_until', int(lease_until), 'created_at', int(now))
redis.call('PEXPIRE', KEYS[1], keep(lease_ms + tonumber(ARGV[4])))
return {'acquired', lease_until, took_over}
";

/// KEYS: rec, live, chunks. ARGV: token, lease ms, in-flight grace ms, linger ms.
/// Answers the new `lease_until`, or nil when the token does not own the record.
const RENEW: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'flight' or r[2] ~= ARGV[1] then return false end
local lease_ms = tonumber(ARGV[2])
local lease_until = now_ms() + lease_ms
redis.call('HSET', KEYS[1], 'lease_until', int(lease_until))
redis.call('PEXPIRE', KEYS[1], keep(lease_ms + tonumber(ARGV[3])))
-- The owner's live log lives as long as its lease, and lingers after it.
if redis.call('HGET', KEYS[2], 'token') == ARGV[1] then
  local ms = keep(lease_ms + tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[2], ms)
  redis.call('PEXPIRE', KEYS[3], ms)
end
return lease_until
";

/// KEYS: rec. ARGV: token, encoded response, expires_at, expiry margin ms, publish
/// command, channel. Answers 1, or 0 when the token does not own the record.
const COMPLETE: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'flight' or r[2] ~= ARGV[1] then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'state', 'done', 'response', ARGV[2], 'expires_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'lease_until')
-- Expiry is judged from expires_at; Redis removes the record a margin after it.
redis.call('PEXPIRE', KEYS[1], keep(tonumber(ARGV[3]) + tonumber(ARGV[4]) - now))
redis.call(ARGV[5], ARGV[6], 'complete')
return 1
";

/// KEYS: rec. ARGV: token, publish command, channel. Answers 1, or 0 when the token
/// does not own the record. The live log stays, for `live_end`.
const RELEASE: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'flight' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call(ARGV[2], ARGV[3], 'release')
return 1
";

/// KEYS: rec, live, chunks. ARGV: publish command, channel. Answers 1 when there was
/// a record.
const PURGE: &str = r"
local existed = redis.call('DEL', KEYS[1])
local logs = redis.call('DEL', KEYS[2], KEYS[3])
if existed > 0 or logs > 0 then redis.call(ARGV[1], ARGV[2], 'purge') end
return existed
";

/// KEYS: rec, live, chunks. ARGV: token, encoded head, linger ms, publish command,
/// channel. Answers 1, or 0 when the token does not own an in-flight record.
const LIVE_BEGIN: &str = r"
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'lease_until')
if r[1] ~= 'flight' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'head', ARGV[2])
local left = (tonumber(r[3]) or 0) - now_ms()
if left < 0 then left = 0 end
redis.call('PEXPIRE', KEYS[2], keep(left + tonumber(ARGV[3])))
redis.call(ARGV[4], ARGV[5], 'begin')
return 1
";

/// KEYS: rec, live, chunks. ARGV: token, number of the first chunk, linger ms,
/// publish command, channel, then the chunks. Answers 1; 0 when the token does not
/// own the record (in flight or completed) and an open log; -1 when the first chunk
/// lies past the end of the log (a gap).
const LIVE_APPEND: &str = r"
local r = redis.call('HMGET', KEYS[1], 'token', 'lease_until')
if r[1] ~= ARGV[1] then return 0 end
local log = redis.call('HMGET', KEYS[2], 'token', 'end')
if log[1] ~= ARGV[1] or log[2] then return 0 end
local len = redis.call('LLEN', KEYS[3])
local first = tonumber(ARGV[2])
if first > len then return -1 end
-- Chunks numbered below the length are in the log already (a retried append).
local from = 6 + len - first
if from > #ARGV then return 1 end
local batch = {}
for i = from, #ARGV do
  batch[#batch + 1] = ARGV[i]
  if #batch == 256 then
    redis.call('RPUSH', KEYS[3], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('RPUSH', KEYS[3], unpack(batch)) end
local left = (tonumber(r[2]) or 0) - now_ms()
if left < 0 then left = 0 end
local ms = keep(left + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], ms)
redis.call('PEXPIRE', KEYS[3], ms)
redis.call(ARGV[4], ARGV[5], 'append')
return 1
";

/// KEYS: live, chunks. ARGV: token, end (`complete` or `broken`), linger ms, publish
/// command, channel. Answers 1, or 0 when the log is not the token's. The first end
/// stays.
const LIVE_END: &str = r"
local log = redis.call('HMGET', KEYS[1], 'token', 'end')
if log[1] ~= ARGV[1] then return 0 end
if not log[2] then redis.call('HSET', KEYS[1], 'end', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[4], ARGV[5], 'end')
return 1
";

/// KEYS: live, chunks. ARGV: number of the first chunk to read. Answers nil when
/// there is no log, else `{token, head, end or '', chunks}` read in one step.
const LIVE_READ: &str = r"
local log = redis.call('HMGET', KEYS[1], 'token', 'head', 'end')
if not log[1] then return false end
return {log[1], log[2] or '', log[3] or '', redis.call('LRANGE', KEYS[2], ARGV[1], -1)}
";

/// ARGV: how many may be deleted, in-flight grace ms, then the candidate records
/// (from one SCAN page, so all on the node the script runs on). Deletes expired
/// completed records and in-flight records whose lease ran out more than the grace
/// ago, in order, until the limit; answers `{deleted, examined}`.
const SWEEP: &str = r"
local now = now_ms()
local limit = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local deleted = 0
for i = 3, #ARGV do
  if deleted >= limit then return {deleted, i - 3} end
  local r = redis.call('HMGET', ARGV[i], 'state', 'lease_until', 'expires_at')
  local dead = false
  if r[1] == 'done' then
    dead = (tonumber(r[3]) or 0) <= now
  elseif r[1] == 'flight' then
    dead = (tonumber(r[2]) or 0) + grace <= now
  end
  if dead then
    redis.call('DEL', ARGV[i])
    deleted = deleted + 1
  end
end
return {deleted, #ARGV - 2}
";

/// The scripts, compiled once (their SHA-1 computed) and sent by `EVALSHA`, with
/// `EVAL` as the fallback when a server does not know them yet.
pub(crate) struct Scripts {
    pub(crate) claim: Script,
    pub(crate) renew: Script,
    pub(crate) complete: Script,
    pub(crate) release: Script,
    pub(crate) purge: Script,
    pub(crate) live_begin: Script,
    pub(crate) live_append: Script,
    pub(crate) live_end: Script,
    pub(crate) live_read: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    claim: script(CLAIM),
    renew: script(RENEW),
    complete: script(COMPLETE),
    release: script(RELEASE),
    purge: script(PURGE),
    live_begin: script(LIVE_BEGIN),
    live_append: script(LIVE_APPEND),
    live_end: script(LIVE_END),
    live_read: script(LIVE_READ),
});

/// The sweep script's source, sent with `EVAL` to the node that was scanned (sweeps
/// are rare, and `EVALSHA`'s fallback cannot be routed to a chosen node). A cluster
/// node's SCAN page spans its slots, which one script may touch only with the
/// `allow-cross-slot-keys` flag (Redis 7); a single server needs no flag (and Redis 6
/// would not parse one).
pub(crate) fn sweep_source(cross_slot: bool) -> String {
    match cross_slot {
        true => format!("#!lua flags=allow-cross-slot-keys\n{PRELUDE}{SWEEP}"),
        false => format!("{PRELUDE}{SWEEP}"),
    }
}
