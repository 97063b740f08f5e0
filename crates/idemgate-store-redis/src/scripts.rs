//! The Lua scripts: one per operation, each one atomic and one round trip. "Now" is always the
//! server's `TIME`. A record is a hash:
//!
//! | field | meaning |
//! | --- | --- |
//! | `v` | layout version (`1`) |
//! | `ns`, `sc`, `k` | namespace, scope label, client key |
//! | `fp` | fingerprint: algorithm tag byte + 32-byte digest |
//! | `ca`, `xa` | created at, expires at (ms since the epoch, server clock) |
//! | `st` | `i` in flight, `c` completed, `u` outcome unknown |
//! | `ep` | epoch |
//! | `tk`, `ow`, `le` | in flight: token (32 hex digits), owner, lease expiry |
//! | `ct`, `out` | completed: completion time, encoded outcome |
//! | `us` | unknown: since |
//! | `w` | in flight: present once a claim found the record in flight (someone may wait) |
//!
//! Completions, outcome-unknown marks and releases are published on the store's channel only
//! when `w` is present: a claim that finds a record in flight sets it in the same atomic step in
//! which it reads the record, so a waiter (whose engine always reads through `claim`) normally
//! either sees the finished record or hears of its end. Most first executions have no waiter and
//! publish nothing. The announcement stays a hint: the mark can be lost (refused at
//! `maxmemory`, written to a primary that was just demoted, not yet replicated at a failover),
//! and so can the message; a waiter then finds the end at its next poll.
//!
//! The key also carries a native expiry (`PEXPIREAT xa`); the scripts check `xa > now` themselves
//! too, so that expiry is exact (Redis keeps a key during the millisecond it expires at).

use redis::Script;

const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n) return string.format('%d', n) end
local function held(now, ep, tk)
  local f = redis.call('HMGET', KEYS[1], 'st', 'ep', 'tk', 'xa', 'le', 'w')
  if f[1] == 'i' and f[2] == ep and f[3] == tk and tonumber(f[4]) and tonumber(f[4]) > now then
    return f
  end
  return nil
end
local function live(now)
  local xa = tonumber(redis.call('HGET', KEYS[1], 'xa'))
  if xa == nil then
    return redis.call('EXISTS', KEYS[1]) == 1
  end
  return xa > now
end
local function extend(xa, le)
  if le > xa then
    redis.call('HSET', KEYS[1], 'xa', fmt(le))
    redis.call('PEXPIREAT', KEYS[1], le)
  end
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// ARGV: ns, sc, k, fp, tk, ow, lease_ms, ttl_ms, revoked token → `{1, now, epoch}` acquired
/// (epoch 1, or the next epoch of a free key: released or revoked, its lease over), or
/// `{0, now, HGETALL}` (a record found in flight gets `w`, see the module docs).
pub fn claim() -> Script {
    script(
        r#"
local now = now_ms()
local ep = 1
if redis.call('EXISTS', KEYS[1]) == 1 then
  local f = redis.call('HMGET', KEYS[1], 'xa', 'st', 'tk', 'le', 'ep', 'w')
  local xa = tonumber(f[1])
  if xa == nil or xa > now then
    if f[2] == 'i' and f[3] == ARGV[9] and tonumber(f[4]) and now >= tonumber(f[4]) then
      ep = tonumber(f[5]) + 1
    else
      local found = redis.call('HGETALL', KEYS[1])
      if f[2] == 'i' and not f[6] then
        -- Once per record (a waiter's every poll would otherwise be a write sent to the AOF
        -- and the replicas). pcall: at `maxmemory` the mark is refused, and then the finishing
        -- script does not publish; the waiter still polls (latency, never correctness).
        redis.pcall('HSET', KEYS[1], 'w', '1')
      end
      return {0, now, found}
    end
  end
  -- Replacing a record: a write that may grow memory first. At `maxmemory` (noeviction) Redis
  -- refuses a script's first such write and lets every later write of a script that has written
  -- through; a DEL first would let a new claim in past `maxmemory`, this way it is refused (OOM)
  -- before anything changed.
  redis.call('HSET', KEYS[1], 'v', '1')
  redis.call('DEL', KEYS[1])
end
local le = now + tonumber(ARGV[7])
local xa = math.max(now + tonumber(ARGV[8]), le)
-- An absent key: this HSET is the first write, refused at `maxmemory` before anything changed.
redis.call('HSET', KEYS[1], 'v', '1', 'ns', ARGV[1], 'sc', ARGV[2], 'k', ARGV[3], 'fp', ARGV[4],
  'ca', fmt(now), 'xa', fmt(xa), 'st', 'i', 'ep', fmt(ep), 'tk', ARGV[5], 'ow', ARGV[6],
  'le', fmt(le))
redis.call('PEXPIREAT', KEYS[1], xa)
return {1, now, fmt(ep)}
"#,
    )
}

/// ARGV: ep, tk, lease_ms → 1 renewed, 0 lost.
pub fn renew() -> Script {
    script(
        r#"
local now = now_ms()
local f = held(now, ARGV[1], ARGV[2])
if not f then return 0 end
local le = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'le', fmt(le))
extend(tonumber(f[4]), le)
return 1
"#,
    )
}

/// ARGV: ep, tk, ttl_ms, outcome bytes, channel → 1 stored (and the key published on the
/// channel when `w` is set, for waiters on other instances), 0 lost.
pub fn complete() -> Script {
    script(
        r#"
local now = now_ms()
local f = held(now, ARGV[1], ARGV[2])
if not f then return 0 end
local xa = now + tonumber(ARGV[3])
redis.call('HDEL', KEYS[1], 'tk', 'ow', 'le', 'w')
redis.call('HSET', KEYS[1], 'st', 'c', 'ct', fmt(now), 'out', ARGV[4], 'xa', fmt(xa))
redis.call('PEXPIREAT', KEYS[1], xa)
if f[6] then redis.call('PUBLISH', ARGV[5], KEYS[1]) end
return 1
"#,
    )
}

/// ARGV: ep, tk, ttl_ms, channel → 1 marked (and published when `w` is set), 0 lost.
pub fn mark_unknown() -> Script {
    script(
        r#"
local now = now_ms()
local f = held(now, ARGV[1], ARGV[2])
if not f then return 0 end
local xa = now + tonumber(ARGV[3])
redis.call('HDEL', KEYS[1], 'tk', 'ow', 'le', 'w')
redis.call('HSET', KEYS[1], 'st', 'u', 'us', fmt(now), 'xa', fmt(xa))
redis.call('PEXPIREAT', KEYS[1], xa)
if f[6] then redis.call('PUBLISH', ARGV[4], KEYS[1]) end
return 1
"#,
    )
}

/// ARGV: ep, tk, channel, revoked token, released owner → 1 released (the record becomes a free
/// key with its epoch as the floor; published when `w` is set), 0 lost.
pub fn release() -> Script {
    script(
        r#"
local now = now_ms()
local f = held(now, ARGV[1], ARGV[2])
if not f then return 0 end
redis.call('HSET', KEYS[1], 'tk', ARGV[4], 'ow', ARGV[5], 'le', fmt(now))
if f[6] then redis.call('PUBLISH', ARGV[3], KEYS[1]) end
return 1
"#,
    )
}

/// ARGV: ep, tk, new tk, owner, lease_ms → `{1, now, new ep}` or `{0, now, HGETALL or {}}`.
pub fn take_over() -> Script {
    script(
        r#"
local now = now_ms()
local f = held(now, ARGV[1], ARGV[2])
if f and tonumber(f[5]) and now >= tonumber(f[5]) then
  local ep = tonumber(f[2]) + 1
  local le = now + tonumber(ARGV[5])
  redis.call('HSET', KEYS[1], 'ep', fmt(ep), 'tk', ARGV[3], 'ow', ARGV[4], 'le', fmt(le))
  extend(tonumber(f[4]), le)
  return {1, now, fmt(ep)}
end
if live(now) then
  return {0, now, redis.call('HGETALL', KEYS[1])}
end
return {0, now, {}}
"#,
    )
}

/// → `{now, HGETALL}` (empty when absent or expired).
pub fn get() -> Script {
    script(
        r#"
local now = now_ms()
if live(now) then
  return {now, redis.call('HGETALL', KEYS[1])}
end
return {now, {}}
"#,
    )
}

/// ARGV: mode (`f` finished only, `u` outcome-unknown only, `x` force: revoke an in-flight
/// record), revoked token, revoked owner, channel → `{0, now}` absent (an expired record is
/// removed), `{1, now}` deleted (a finished record, or one already revoked), `{2, now, epoch}` in
/// flight and revoked (token and lease replaced; published, so waiters take over at once),
/// `{3, now, HGETALL}` refused.
pub fn delete() -> Script {
    script(
        r#"
local now = now_ms()
if not live(now) then
  redis.call('DEL', KEYS[1])
  return {0, now}
end
local f = redis.call('HMGET', KEYS[1], 'st', 'ep', 'tk')
if f[1] == 'i' then
  if f[3] == ARGV[2] and ARGV[1] ~= 'u' then
    redis.call('DEL', KEYS[1])
    return {1, now}
  end
  if ARGV[1] == 'x' then
    redis.call('HSET', KEYS[1], 'tk', ARGV[2], 'ow', ARGV[3], 'le', fmt(now))
    redis.call('PUBLISH', ARGV[4], KEYS[1])
    return {2, now, f[2]}
  end
  return {3, now, redis.call('HGETALL', KEYS[1])}
end
if ARGV[1] == 'x' or (f[1] == 'c' and ARGV[1] == 'u') then
  return {3, now, redis.call('HGETALL', KEYS[1])}
end
redis.call('DEL', KEYS[1])
return {1, now}
"#,
    )
}

/// ARGV: ep, us (the marking instant, ms), ttl_ms, outcome bytes → `{0, now}` absent, `{1, now}`
/// completed (an outcome-unknown record with exactly that epoch and marking instant), `{2, now,
/// HGETALL}` refused. The growing `HSET` comes first: at `maxmemory` (noeviction) it is refused
/// before anything changed.
pub fn complete_unknown() -> Script {
    script(
        r#"
local now = now_ms()
if not live(now) then return {0, now} end
local f = redis.call('HMGET', KEYS[1], 'st', 'ep', 'us')
if f[1] == 'u' and f[2] == ARGV[1] and f[3] == ARGV[2] then
  local xa = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'st', 'c', 'ct', fmt(now), 'out', ARGV[4], 'xa', fmt(xa))
  redis.call('HDEL', KEYS[1], 'us')
  redis.call('PEXPIREAT', KEYS[1], xa)
  return {1, now}
end
return {2, now, redis.call('HGETALL', KEYS[1])}
"#,
    )
}
