"""The Lua scripts behind the distributed breakers and instance selection.

Each runs atomically inside Redis and reads the clock with ``TIME`` there, so every process
agrees on "now" whatever its own clock says. A breaker is one hash (see
:mod:`hms_tasks.health.breaker` for its fields) plus a capped list of recent failure times;
every change of state bumps the hash's ``epoch`` and appends an event to a capped stream.
"""

from __future__ import annotations

__all__ = ["ADMIT", "PICK", "RECORD"]

_NOW = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A caller asks to pass a breaker that is not closed (the hot path reads closed breakers with
# one HMGET and never gets here).
# KEYS: [1] breaker hash, [2] event stream.
# ARGV: [1] reset timeout ms, [2] half-open trial calls, [3] breaker name, [4] events kept,
#       [5] hash TTL s.
# Returns {verdict, epoch, wait ms, transitioned}: verdict 'closed' (pass), 'trial' (pass as
# one of the half-open trial calls), 'open' or 'busy' (refused; trials all taken).
ADMIT = _NOW + r"""
local h = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'opened_at', 'half_open_at', 'trials')
local state = h[1] or 'closed'
local epoch = tonumber(h[2] or '0')
if state == 'closed' then return {'closed', epoch, 0, 0} end
local reset = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
if state == 'open' then
  local due = tonumber(h[3] or '0') + reset
  if now < due then return {'open', epoch, due - now, 0} end
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'v', 1, 'state', 'half_open', 'epoch', epoch,
             'half_open_at', now, 'trials', 1, 'changed_at', now)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'v', 1, 'breaker', ARGV[3],
             'from', 'open', 'to', 'half_open', 'at', now, 'source', 'call')
  return {'trial', epoch, 0, 1}
end
local since = tonumber(h[4] or '0')
local trials = tonumber(h[5] or '0')
if now >= since + reset then
  -- The last round's trial calls never reported back (their callers died): a new round.
  trials = 0
  since = now
  redis.call('HSET', KEYS[1], 'half_open_at', now)
end
if trials < max then
  redis.call('HSET', KEYS[1], 'trials', trials + 1)
  return {'trial', epoch, 0, 0}
end
return {'busy', epoch, since + reset - now, 0}
"""

# The outcome of a call or a check.
# KEYS: [1] breaker hash, [2] failure-time list, [3] event stream.
# ARGV: [1] 'success' or 'failure', [2] epoch the caller was admitted under ('' = whatever is
#       current: sweeps), [3] failures this outcome counts for, [4] failure threshold,
#       [5] failure window ms, [6] reset timeout ms, [7] source ('call' or 'sweep'),
#       [8] breaker name, [9] events kept, [10] hash TTL s.
# An outcome admitted under an older epoch is ignored: the breaker has moved on since.
# Closed: a failure pushes its time (weight times) onto the list, capped at the threshold;
# the breaker opens when the list is full and its oldest entry is within the window.
# Half-open (or open past its reset timeout): a success closes it, a failure re-opens it.
# Returns {state, epoch, previous state or ''}: previous is set when the state changed.
RECORD = _NOW + r"""
local h = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'opened_at')
local state = h[1] or 'closed'
local epoch = tonumber(h[2] or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= epoch then return {state, epoch, ''} end
local probing = state == 'half_open' or
  (state == 'open' and now >= tonumber(h[3] or '0') + tonumber(ARGV[6]))
local new = nil
if ARGV[1] == 'failure' then
  if state == 'closed' then
    local n = tonumber(ARGV[4])
    local window = tonumber(ARGV[5])
    for i = 1, tonumber(ARGV[3]) do redis.call('LPUSH', KEYS[2], now) end
    redis.call('LTRIM', KEYS[2], 0, n - 1)
    redis.call('PEXPIRE', KEYS[2], math.floor(window) + 1000)
    if redis.call('LLEN', KEYS[2]) >= n and
       tonumber(redis.call('LINDEX', KEYS[2], n - 1)) >= now - window then
      new = 'open'
    end
  elseif probing then
    new = 'open'
  end
elseif probing then
  new = 'closed'
end
if not new then return {state, epoch, ''} end
epoch = epoch + 1
if new == 'open' then
  redis.call('HSET', KEYS[1], 'v', 1, 'state', 'open', 'epoch', epoch, 'opened_at', now,
             'trials', 0, 'changed_at', now)
else
  redis.call('HSET', KEYS[1], 'v', 1, 'state', 'closed', 'epoch', epoch, 'trials', 0,
             'changed_at', now)
end
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[10])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[9], '*', 'v', 1, 'breaker', ARGV[8],
           'from', state, 'to', new, 'at', now, 'source', ARGV[7])
return {new, epoch, state}
"""

# Pick an instance of a service, skipping those whose breaker is open.
# KEYS: [1] round-robin counter, then per instance i (1-based): [2i] breaker hash,
#       [2i+1] in-flight lease set (sorted set of lease tokens scored by expiry ms).
# ARGV: [1] 'round_robin' or 'least_connections', [2] instances, [3] reset timeout ms,
#       [4] lease token ('' = no lease), [5] lease ms.
# Instances with a closed breaker come first, then half-open ones (or open past the reset
# timeout), never open ones. Round robin takes the first in rotation order; least connections
# the fewest unexpired leases, ties in rotation order. Returns {index or 0, in-flight count}.
PICK = _NOW + r"""
local n = tonumber(ARGV[2])
local reset = tonumber(ARGV[3])
local start = redis.call('INCR', KEYS[1]) - 1
if start >= 1000000000 then redis.call('SET', KEYS[1], 0) end
local lc = ARGV[1] == 'least_connections'
local best, bestclass, bestload = 0, 0, 0
for j = 0, n - 1 do
  local i = (start + j) % n + 1
  local h = redis.call('HMGET', KEYS[2 * i], 'state', 'opened_at')
  local class = 2
  if h[1] == 'half_open' then
    class = 1
  elseif h[1] == 'open' then
    if now >= tonumber(h[2] or '0') + reset then class = 1 else class = 0 end
  end
  if class > 0 then
    local load = 0
    if lc then
      redis.call('ZREMRANGEBYSCORE', KEYS[2 * i + 1], '-inf', now)
      load = redis.call('ZCARD', KEYS[2 * i + 1])
    end
    if class > bestclass or (lc and class == bestclass and load < bestload) then
      best, bestclass, bestload = i, class, load
    end
    if not lc and class == 2 then break end
  end
end
if best == 0 then return {0, 0} end
if ARGV[4] ~= '' then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2 * best + 1], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2 * best + 1], lease)
  bestload = redis.call('ZCARD', KEYS[2 * best + 1])
end
return {best, bestload}
"""
