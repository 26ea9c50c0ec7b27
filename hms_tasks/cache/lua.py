"""The Lua scripts behind the tag-aware cache. Each one runs atomically inside Redis.

Value layout. A tagged value is stored as ``HEADER || payload`` where the header is
``\\x00hms1|<tag>=<gen>,<tag>=<gen>|``: the generation token each of its tags had when the data
it was built from were read. A tag's current generation lives at ``<gen prefix><tag>``. A value
is valid only while every one of its tags still has that generation; an invalidation gives the
tag a new generation (so every value built under the old one is dead at once, whatever happened
to the index of its keys) and then unlinks the keys indexed under the tag (so they are gone,
not just dead). Anything missing (an evicted generation, say) reads as a miss, never as a hit:
eviction can cost hits, never correctness.

Only on a master that takes writes. Every script starts with a ``#!lua`` shebang and no
``no-writes`` flag, which makes Redis (7.0 or later) refuse it before it runs, as a write, on a
master that refuses writes: ``NOREPLICAS`` under ``min-replicas-to-write`` (a newly promoted
master until the sentinels give it a replica), ``READONLY`` on a demoted one, ``MISCONF`` when it
cannot persist, ``OOM`` past ``maxmemory`` with nothing to evict (``scriptPrepareForRun`` in
Redis's ``src/script.c``). That includes the reads: a master that cannot take this process's
invalidations (they are buffered until it can, :mod:`hms_tasks.cache.changes`) must not serve
values those invalidations kill. Without the shebang a script that only reads runs anywhere
(Redis checks each write inside a shebang-less script as it comes), and during a failover
served values whose invalidation no master could take yet. The callers read the database
instead (``get_or_build``: a miss).

The fill race (a value computed from data read before an invalidation, stored after it) is
closed the way the NSDI'13 memcache leases close it: the reader takes the tags' generations
*before* reading the database, and the fill stores the value only if they are unchanged.
"""

from __future__ import annotations

__all__ = [
    "APPLY_CHANGES",
    "CURRENT_GENERATIONS",
    "FILL",
    "FILL_MANY",
    "GENERATIONS",
    "HEADER_MAGIC",
    "INVALIDATE",
    "NEW_EPOCH",
    "READ",
    "READ_MANY",
    "RECORD_CHANGES",
]

HEADER_MAGIC = "\x00hms1|"

#: The first line of every script (see the module docstring): refused where writes are.
_WRITABLE = "#!lua\n"

# Shared helper (after the shebang): is the value (string) still valid? Returns payload and
# header ("tag=gen,...", '' for an untagged value), or false.
_VALID = _WRITABLE + r"""
local function hms_valid(v, genprefix)
  if string.sub(v, 1, 6) ~= '\0hms1|' then
    return v, ''
  end
  local e = string.find(v, '|', 7, true)
  if not e then return false end
  local header = string.sub(v, 7, e - 1)
  if header ~= '' then
    local tags, gens = {}, {}
    for pair in string.gmatch(header, '[^,]+') do
      local eq = string.find(pair, '=', 1, true)
      tags[#tags + 1] = genprefix .. string.sub(pair, 1, eq - 1)
      gens[#gens + 1] = string.sub(pair, eq + 1)
    end
    local current = redis.call('MGET', unpack(tags))
    for i = 1, #gens do
      if current[i] ~= gens[i] then return false end
    end
  end
  return string.sub(v, e + 1), header
end
"""

# GET through generation checks.
# KEYS: value keys. ARGV[1]: generation key prefix. Returns a list: payload or false per key.
READ_MANY = _VALID + r"""
local out = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then out[i] = hms_valid(v, ARGV[1]) else out[i] = false end
end
return out
"""

# Read-through read of one key, with the lease for its fill on a miss.
# KEYS[1]: value key. ARGV: 1 gen prefix, 2 lock key, 3 lock token, 4 lock ttl ms,
# 5 new-generation token, 6 generation ttl s, 7 stats hash key, 8 stats field prefix (kind),
# 9 heat zset key (or ''), 10 stats ttl s, 11.. tags.
# Returns {1, payload, header} on a hit (the header's generations are the current ones: an ETag
# needs no second round trip); {0, lock_acquired, gen1, gen2, ...} on a miss, the generations
# of the tags *now*, before the caller reads the database.
READ = _VALID + r"""
local v = redis.call('GET', KEYS[1])
if ARGV[9] ~= '' then
  redis.call('ZINCRBY', ARGV[9], 1, KEYS[1])
end
if v then
  local p, h = hms_valid(v, ARGV[1])
  if p then
    redis.call('HINCRBY', ARGV[7], ARGV[8] .. ':hit', 1)
    redis.call('EXPIRE', ARGV[7], ARGV[10])
    return {1, p, h}
  end
end
redis.call('HINCRBY', ARGV[7], ARGV[8] .. ':miss', 1)
redis.call('EXPIRE', ARGV[7], ARGV[10])
local out = {0, 0}
if redis.call('SET', ARGV[2], ARGV[3], 'NX', 'PX', ARGV[4]) then out[2] = 1 end
for i = 11, #ARGV do
  local g = ARGV[1] .. ARGV[i]
  local cur = redis.call('GET', g)
  if not cur then
    cur = ARGV[5] .. ':' .. i
    redis.call('SET', g, cur, 'EX', ARGV[6])
  end
  out[#out + 1] = cur
end
return out
"""

# The current generations of KEYS (generation keys), creating none: MGET, as a script so that
# a master that refuses writes does not confirm a client's copy (a 304) either.
CURRENT_GENERATIONS = _WRITABLE + r"""
return redis.call('MGET', unpack(KEYS))
"""

# Generations of tags, creating missing ones (used by batch warming before its DB read).
# ARGV: 1 gen prefix, 2 new-generation token, 3 generation ttl s, 4.. tags. Returns gens.
GENERATIONS = _WRITABLE + r"""
local out = {}
for i = 4, #ARGV do
  local g = ARGV[1] .. ARGV[i]
  local cur = redis.call('GET', g)
  if not cur then
    cur = ARGV[2] .. ':' .. i
    redis.call('SET', g, cur, 'EX', ARGV[3])
  end
  out[#out + 1] = cur
end
return out
"""

# Store a value only if its tags' generations are still those read before the build.
# KEYS[1]: value key. ARGV: 1 gen prefix, 2 tag-index prefix, 3 value (header+payload),
# 4 value ttl s, 5 index/generation ttl s, 6 lock key ('' for none), 7 lock token,
# 8.. tag, gen pairs. Returns 1 if stored, 0 if refused as stale.
FILL = _WRITABLE + r"""
local stored = 1
for i = 8, #ARGV, 2 do
  if redis.call('GET', ARGV[1] .. ARGV[i]) ~= ARGV[i + 1] then stored = 0 break end
end
if stored == 1 then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
  for i = 8, #ARGV, 2 do
    -- 'all' (the cache-wide tag) is never indexed: its index would hold every key.
    if ARGV[i] ~= 'all' then
      local idx = ARGV[2] .. ARGV[i]
      redis.call('SADD', idx, KEYS[1])
      redis.call('EXPIRE', idx, ARGV[5])
    end
    redis.call('EXPIRE', ARGV[1] .. ARGV[i], ARGV[5])
  end
end
if ARGV[6] ~= '' and redis.call('GET', ARGV[6]) == ARGV[7] then
  redis.call('DEL', ARGV[6])
end
return stored
"""

# Shared helper: give each tag a new generation, then unlink every key indexed under it.
# Returns keys unlinked; appends the unlinked keys whose heat is >= hotscore to ``hot``.
_INVALIDATE_FN = _WRITABLE + r"""
local function hms_invalidate(tags, genprefix, idxprefix, token, genttl, heatkey, hotscore, hot)
  local removed = 0
  for i, tag in ipairs(tags) do
    redis.call('SET', genprefix .. tag, token .. ':' .. i, 'EX', genttl)
    local idx = idxprefix .. tag
    local members = redis.call('SMEMBERS', idx)
    for s = 1, #members, 1000 do
      local chunk = {unpack(members, s, math.min(s + 999, #members))}
      removed = removed + redis.call('UNLINK', unpack(chunk))
      if heatkey ~= '' then
        for _, k in ipairs(chunk) do
          local score = redis.call('ZSCORE', heatkey, k)
          -- Capped: refresh-ahead of a few thousand keys is plenty; more would be a stampede.
          if score and tonumber(score) >= hotscore and #hot < 5000 then hot[#hot + 1] = k end
        end
      end
    end
    redis.call('DEL', idx)
  end
  return removed
end
"""

# FILL for many keys in one call (warming). KEYS: value keys. ARGV: 1 gen prefix, 2 tag-index
# prefix, 3 ttl s, 4 index ttl s, then one value per key. The tags and the generations a value
# was built under are read from its own header ("\0hms1|tag=gen,tag=gen|..."), not passed
# beside it: a sixth of the arguments to pack and send. Returns how many were stored.
FILL_MANY = _WRITABLE + r"""
local stored = 0
local current = {}  -- generations read once per call: 'all' is on every key
for k = 1, #KEYS do
  local value = ARGV[k + 4]
  local e = string.find(value, '|', 7, true)
  local ok, tags = e ~= nil, {}
  if ok then
    for pair in string.gmatch(string.sub(value, 7, e - 1), '[^,]+') do
      local eq = string.find(pair, '=', 1, true)
      local tag = string.sub(pair, 1, eq - 1)
      if current[tag] == nil then current[tag] = redis.call('GET', ARGV[1] .. tag) end
      if current[tag] ~= string.sub(pair, eq + 1) then ok = false break end
      tags[#tags + 1] = tag
    end
  end
  if ok then
    redis.call('SET', KEYS[k], value, 'EX', ARGV[3])
    for _, tag in ipairs(tags) do
      if tag ~= 'all' then
        local idx = ARGV[2] .. tag
        redis.call('SADD', idx, KEYS[k])
        redis.call('EXPIRE', idx, ARGV[4])
      end
    end
    stored = stored + 1
  end
end
return stored
"""

# Invalidate tags. ARGV: 1 gen prefix, 2 tag-index prefix, 3 new-generation token,
# 4 generation ttl s, 5 heat zset key ('' to skip hot-key detection), 6 hot threshold,
# 7.. tags. Returns {keys unlinked, hot key 1, hot key 2, ...}.
INVALIDATE = _INVALIDATE_FN + r"""
local hot = {}
local tags = {unpack(ARGV, 7)}
local removed = hms_invalidate(tags, ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
                               tonumber(ARGV[6]), hot)
table.insert(hot, 1, removed)
return hot
"""

# Record committed changes, at commit: give each tag a new generation (from this call on, no
# read returns a value cached under the old one, and no fill that read the old generation
# stores), append the batches to the change log (the worker unlinks the dead keys and re-warms
# the hot ones), and ask for a fan-out task unless one is already pending.
# KEYS: 1 change list, 2 pending flag. ARGV: 1 gen prefix, 2 new-generation token,
# 3 generation ttl s, 4 pending ttl s, 5.. batches (JSON lists of tags).
# Returns 1 if the caller must dispatch the fan-out task.
RECORD_CHANGES = _WRITABLE + r"""
local n = 0
for b = 5, #ARGV do
  for _, tag in ipairs(cjson.decode(ARGV[b])) do
    n = n + 1
    redis.call('SET', ARGV[1] .. tag, ARGV[2] .. ':' .. n, 'EX', ARGV[3])
  end
  redis.call('RPUSH', KEYS[1], ARGV[b])
end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[4]) then return 1 end
return 0
"""

# Apply up to ARGV[1] batches of the change log: take them off the list and invalidate their
# tags in the same atomic step, so a worker dying half-way loses nothing. With ARGV[8] = '1' and
# the list empty afterwards, clear the pending flag in that same step too: a batch recorded
# later then dispatches a new task. KEYS: 1 change list, 2 pending flag. ARGV: 1 max batches,
# 2 gen prefix, 3 tag-index prefix, 4 token, 5 generation ttl s, 6 heat key, 7 hot threshold,
# 8 clear flag if empty. Returns {batches, tags, keys unlinked, hot keys...}.
APPLY_CHANGES = _INVALIDATE_FN + r"""
local batches = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
redis.call('LTRIM', KEYS[1], #batches, -1)
local seen, tags = {}, {}
for _, b in ipairs(batches) do
  for _, t in ipairs(cjson.decode(b)) do
    if not seen[t] then seen[t] = true; tags[#tags + 1] = t end
  end
end
local hot = {}
local removed = hms_invalidate(tags, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
                               tonumber(ARGV[7]), hot)
if ARGV[8] == '1' and redis.call('LLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
return {#batches, #tags, removed, unpack(hot)}
"""

# A new Redis master (after a failover): every value built before it dies, whatever bumps the
# failover lost, by a new generation of the cache-wide tag: once per master (its replid), or
# always when ARGV[4] is '1' (a client that was writing to the old master moves over).
# KEYS: 1 epoch key, 2 generation key of the cache-wide tag. ARGV: 1 replid, 2 new-generation
# token, 3 generation ttl s, 4 '1' to end the epoch even if this master has. Returns 1 when it
# ended the epoch, 0 when not.
NEW_EPOCH = _WRITABLE + r"""
if ARGV[4] ~= '1' and redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
