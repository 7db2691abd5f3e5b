"""The Lua scripts behind `RedisLimiter`: each step on the shared state is one atomic call.

Keys, under a namespace `ns` (no secret in any of them):
  ns:lease:<pool>     ZSET lease id -> expiry (ms, Redis clock): the slots taken
  ns:accepted:<pool>  ZSET lease id -> expiry: the slots whose task BFL accepted
  ns:queue            ZSET ticket id -> place: the global FIFO of waiting submits
  ns:ticket           HASH ticket id -> its pools, comma-separated
  ns:ticket_exp       ZSET ticket id -> expiry: a dead process's tickets go
  ns:dropped          ZSET ticket id -> expiry: tickets dropped before they were registered
                      (a GRANT still on its way must not queue them)
  ns:seq              the counter that gives tickets their place
  ns:adapt            HASH eff:<pool> (limit lowered after a 429), refused:<pool> (when)
  ns:polls            the earliest moment (us) the next poll of the account may leave
Channels: ns:released (a slot came free), ns:events (verified webhook events).
Every time is Redis's own clock (TIME), so the processes' clocks never need to agree.
"""

from __future__ import annotations

__all__ = ["ACCEPTED", "CLAIM", "DROP", "GRANT", "HEARTBEAT", "POLL", "REFUSED", "USAGE"]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_POOLS = """
local function pools_of(csv)
  local out = {}
  for pool in string.gmatch(csv, '[^,]+') do table.insert(out, pool) end
  return out
end
"""

GRANT = (
    _NOW
    + _POOLS
    + """
-- ARGV: ns, me, lease_ttl_ms, ticket_ttl_ms, n_limits, (pool, limit)*, n_new,
--       (ticket, pools, front)*
local ns, me = ARGV[1], ARGV[2]
local lease_ttl, ticket_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local i = 5
local limits = {}
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do limits[ARGV[i]] = tonumber(ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local id, pools, front = ARGV[i], ARGV[i + 1], ARGV[i + 2]; i = i + 3
  -- Dropped before it got here (its waiter was cancelled while this call was on its way):
  -- queued, it would hold a slot for no one until its TTL.
  if not redis.call('ZSCORE', ns .. ':dropped', id) then
    local place = redis.call('INCR', ns .. ':seq')
    if front == '1' then
      local head = redis.call('ZRANGE', ns .. ':queue', 0, 0, 'WITHSCORES')
      if head[2] then place = tonumber(head[2]) - 1 else place = 0 end
    end
    redis.call('ZADD', ns .. ':queue', place, id)
    redis.call('HSET', ns .. ':ticket', id, pools)
    redis.call('ZADD', ns .. ':ticket_exp', now + ticket_ttl, id)
  end
end
-- Tickets of dead processes, and leases nobody renewed, are gone.
local freed = 0
local dead = redis.call('ZRANGEBYSCORE', ns .. ':ticket_exp', '-inf', now)
for _, id in ipairs(dead) do
  redis.call('ZREM', ns .. ':queue', id)
  redis.call('HDEL', ns .. ':ticket', id)
  redis.call('ZREM', ns .. ':ticket_exp', id)
  freed = freed + 1
end
local free = {}
local wake = -1
for pool, limit in pairs(limits) do
  freed = freed + redis.call('ZREMRANGEBYSCORE', ns .. ':lease:' .. pool, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', ns .. ':accepted:' .. pool, '-inf', now)
  local eff = tonumber(redis.call('HGET', ns .. ':adapt', 'eff:' .. pool) or limit)
  local capacity = math.max(1, math.min(limit, math.floor(eff)))
  free[pool] = capacity - redis.call('ZCARD', ns .. ':lease:' .. pool)
  local first = redis.call('ZRANGE', ns .. ':lease:' .. pool, 0, 0, 'WITHSCORES')
  if first[2] and (wake < 0 or tonumber(first[2]) - now < wake) then
    wake = tonumber(first[2]) - now
  end
end
-- Oldest tickets first; a ticket that fits takes its slots (or keeps them for its own
-- process to take), one that does not blocks its full pools for everyone behind it.
local granted = {}
local queue = redis.call('ZRANGE', ns .. ':queue', 0, -1)
for _, id in ipairs(queue) do
  local room = false
  for _, f in pairs(free) do if f > 0 then room = true end end
  if not room then break end
  local csv = redis.call('HGET', ns .. ':ticket', id)
  if csv then
    local pools = pools_of(csv)
    local fits = true
    for _, pool in ipairs(pools) do
      if (free[pool] or 0) <= 0 then fits = false end
    end
    if fits then
      for _, pool in ipairs(pools) do free[pool] = free[pool] - 1 end
      if string.sub(id, 1, #me) == me then
        for _, pool in ipairs(pools) do
          redis.call('ZADD', ns .. ':lease:' .. pool, now + lease_ttl, id)
        end
        redis.call('ZREM', ns .. ':queue', id)
        redis.call('HDEL', ns .. ':ticket', id)
        redis.call('ZREM', ns .. ':ticket_exp', id)
        table.insert(granted, id)
      end
    end
  end
end
if freed > 0 then redis.call('PUBLISH', ns .. ':released', 'expired') end
local first = redis.call('ZRANGE', ns .. ':ticket_exp', 0, 0, 'WITHSCORES')
if first[2] and (wake < 0 or tonumber(first[2]) - now < wake) then
  wake = tonumber(first[2]) - now
end
return {granted, wake}
"""
)

HEARTBEAT = (
    _NOW
    + _POOLS
    + """
-- ARGV: ns, lease_ttl_ms, ticket_ttl_ms, n_leases, (lease, pools, accepted)*,
--       n_tickets, (ticket, pools)*
local ns = ARGV[1]
local lease_ttl, ticket_ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
local lost, requeued = {}, {}
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local id, csv, accepted = ARGV[i], ARGV[i + 1], ARGV[i + 2]; i = i + 3
  local missing = false
  for _, pool in ipairs(pools_of(csv)) do
    local key = ns .. ':lease:' .. pool
    local score = redis.call('ZSCORE', key, id)
    if (not score) or tonumber(score) <= now then missing = true end
    -- Put back even when lost: BFL still counts the task (a member is counted once).
    redis.call('ZADD', key, now + lease_ttl, id)
    if accepted == '1' then redis.call('ZADD', ns .. ':accepted:' .. pool, now + lease_ttl, id) end
  end
  if missing then table.insert(lost, id) end
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local id, csv = ARGV[i], ARGV[i + 1]; i = i + 2
  local granted = false
  for _, pool in ipairs(pools_of(csv)) do
    if redis.call('ZSCORE', ns .. ':lease:' .. pool, id) then granted = true end
  end
  local score = redis.call('ZSCORE', ns .. ':ticket_exp', id)
  if granted then
    -- Granted since this call was prepared: nothing to renew.
  elseif (not score) or tonumber(score) <= now then
    -- Expired while this process stalled: back in the queue, at its end.
    if not redis.call('ZSCORE', ns .. ':queue', id) then
      redis.call('ZADD', ns .. ':queue', redis.call('INCR', ns .. ':seq'), id)
      table.insert(requeued, id)
    end
    redis.call('HSET', ns .. ':ticket', id, csv)
  end
  if not granted then redis.call('ZADD', ns .. ':ticket_exp', now + ticket_ttl, id) end
end
return {lost, requeued}
"""
)

DROP = (
    _NOW
    + """
-- ARGV: ns, id, pools, keep_ms: a released slot or an abandoned ticket. Returns leases removed.
local ns, id = ARGV[1], ARGV[2]
local removed = 0
for pool in string.gmatch(ARGV[3], '[^,]+') do
  removed = removed + redis.call('ZREM', ns .. ':lease:' .. pool, id)
  redis.call('ZREM', ns .. ':accepted:' .. pool, id)
end
local queued = redis.call('ZREM', ns .. ':queue', id)
redis.call('HDEL', ns .. ':ticket', id)
redis.call('ZREM', ns .. ':ticket_exp', id)
redis.call('ZREMRANGEBYSCORE', ns .. ':dropped', '-inf', now)
if removed + queued > 0 then
  redis.call('PUBLISH', ns .. ':released', id)
else
  -- Not there (yet): the GRANT registering it may still be on its way. Ids are never
  -- reused, so remembering it a while is never wrong.
  redis.call('ZADD', ns .. ':dropped', now + tonumber(ARGV[4]), id)
end
return removed
"""
)

CLAIM = (
    _NOW
    + """
-- ARGV: ns, id, pools, lease_ttl_ms: a slot for a task already in flight, over the limit if
-- need be (BFL counts it anyway).
local ns, id, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
for pool in string.gmatch(ARGV[3], '[^,]+') do
  redis.call('ZADD', ns .. ':lease:' .. pool, now + ttl, id)
  redis.call('ZADD', ns .. ':accepted:' .. pool, now + ttl, id)
end
return 1
"""
)

ACCEPTED = (
    _NOW
    + """
-- ARGV: ns, id, lease_ttl_ms, probe_after_ms, (pool, limit)*: BFL took the task; the server
-- has room for at least the accepted ones, and grows back once 429s have stopped a while.
local ns, id = ARGV[1], ARGV[2]
local ttl, probe = tonumber(ARGV[3]), tonumber(ARGV[4])
local grew = false
for i = 5, #ARGV, 2 do
  local pool, limit = ARGV[i], tonumber(ARGV[i + 1])
  local key = ns .. ':accepted:' .. pool
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', ns .. ':lease:' .. pool, id) then
    redis.call('ZADD', key, now + ttl, id)
  end
  local eff = redis.call('HGET', ns .. ':adapt', 'eff:' .. pool)
  if eff then
    local value = math.max(tonumber(eff), redis.call('ZCARD', key))
    local refused = tonumber(redis.call('HGET', ns .. ':adapt', 'refused:' .. pool) or 0)
    if now - refused >= probe then value = value + 1 end
    if value >= limit then
      redis.call('HDEL', ns .. ':adapt', 'eff:' .. pool)
    else
      redis.call('HSET', ns .. ':adapt', 'eff:' .. pool, value)
    end
    if value > tonumber(eff) then grew = true end
  end
end
if grew then redis.call('PUBLISH', ns .. ':released', 'grew') end
return 1
"""
)

REFUSED = (
    _NOW
    + """
-- ARGV: ns, (pool, limit)*: BFL answered 429, so drop to what it accepted of ours.
local ns = ARGV[1]
for i = 2, #ARGV, 2 do
  local pool, limit = ARGV[i], tonumber(ARGV[i + 1])
  local key = ns .. ':accepted:' .. pool
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local eff = tonumber(redis.call('HGET', ns .. ':adapt', 'eff:' .. pool) or limit)
  local value = math.max(1, math.min(math.floor(eff), redis.call('ZCARD', key)))
  redis.call('HSET', ns .. ':adapt', 'eff:' .. pool, value, 'refused:' .. pool, now)
end
return 1
"""
)

USAGE = (
    _NOW
    + """
-- ARGV: ns, pool, limit: {slots taken, effective limit, tickets waiting}, expired ones dropped.
local ns, pool, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = ns .. ':lease:' .. pool
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local eff = tonumber(redis.call('HGET', ns .. ':adapt', 'eff:' .. pool) or limit)
return {redis.call('ZCARD', key), math.max(1, math.min(limit, math.floor(eff))),
        redis.call('ZCARD', ns .. ':queue')}
"""
)

POLL = """
-- ARGV: ns, gap_us: book the account's next poll; returns microseconds to wait before it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local key = ARGV[1] .. ':polls'
local gap = tonumber(ARGV[2])
local at = math.max(now, tonumber(redis.call('GET', key) or 0))
redis.call('SET', key, string.format('%d', at + gap), 'PX', math.ceil(gap / 1000) + 60000)
return at - now
"""
