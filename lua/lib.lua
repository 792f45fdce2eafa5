-- lib.lua: shared prelude, prepended (after a clock) to every script.
--
-- KEYS[1] of every script is the tenant base key, "<prefix>:{<tenant>}". Every
-- other key is derived from it, so all of one tenant's keys share one hash
-- tag and one cluster slot.
--
-- Key layout under base B (LK = limit key "<scope>:<dimension>:<window_ms>",
-- scope "T" for the tenant or "A:<agent>" for one agent):
--   B:limits        hash   "T" | "D" | "A:<agent>" -> JSON list of limits
--   B:agents        set    agents that ever had a window of their own
--   B:w:<LK>        hash   window: t (running total), o (oldest bucket index
--                          kept), g (generation), th (1 once 'exhausted' was
--                          announced, until the next admission), ov
--                          (overrun), b<i> buckets
--   B:b:<LK>        zset   waiters blocked on that limit, scored by queue rank
--   B:q             hash   ticket -> "score|created_ms|LK LK ..."
--   B:qexp          zset   ticket -> expiry of its place in the queue (ms)
--   B:seq           string ticket sequence
--   B:r:<id>        hash   reservation: s (state), a (agent), c (charges),
--                          e (estimates), t0 (admitted ms), x (lease expiry)
--   B:leases        zset   open reservation id -> lease expiry (ms)
--   B:ledger        stream one entry per commit
--   B:admin         string last admin action; written first by set_limits and
--                          reset, so a worker ACL user is refused before any change
-- Channels: B:wake (tickets to retry, or "*"), B:events (JSON events).
--
-- Amounts are integers in the dimension's unit (usd in nano-dollars). Lua
-- numbers are doubles, exact to 2^53; they are written back with fmt().

local B = KEYS[1]
local BUCKETS = 60
local THRESHOLDS = {50, 75, 90, 100}

local function fmt(x) return string.format('%d', x) end

local function split(s, sep)
  local out = {}
  if s == nil or s == '' then return out end
  for part in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = part end
  return out
end

local function publish_event(kind, fields)
  fields['type'] = kind
  fields['ts'] = NOW
  redis.call('PUBLISH', B .. ':events', cjson.encode(fields))
end

local function publish_wake(tickets)
  if #tickets > 0 then redis.call('PUBLISH', B .. ':wake', table.concat(tickets, ' ')) end
end

-- limits ------------------------------------------------------------------

local function decode_limits(json, scope)
  local out = {}
  if not json then return out end
  for _, spec in ipairs(cjson.decode(json)) do
    local lk = scope .. ':' .. spec.d .. ':' .. fmt(spec.w)
    out[#out + 1] = {lk = lk, key = B .. ':w:' .. lk, d = spec.d, a = spec.a, w = spec.w,
                     n = BUCKETS, scope = scope}
  end
  return out
end

-- The limits that apply to one agent ('' for none): the tenant's, then the
-- agent's own or, when it has none, the tenant's default for every agent.
local function applicable_limits(agent)
  local out = {}
  local cfg = redis.call('HMGET', B .. ':limits', 'T', 'A:' .. agent, 'D')
  for _, L in ipairs(decode_limits(cfg[1], 'T')) do out[#out + 1] = L end
  if agent ~= '' then
    local own = cfg[2]
    if not own then own = cfg[3] end
    for _, L in ipairs(decode_limits(own, 'A:' .. agent)) do out[#out + 1] = L end
  end
  return out
end

local function limit_from_charge(lk, w)
  local scope, dim = string.match(lk, '^(.*):([%a_]+):%d+$')
  return {lk = lk, key = B .. ':w:' .. lk, d = dim, w = tonumber(w), n = BUCKETS, scope = scope}
end

-- windows -----------------------------------------------------------------

local function bucket_width(L) return math.ceil(L.w / L.n) end

-- Drop the buckets that left the window (each bucket is dropped once, so the
-- cost is O(1) amortized) and return the window's state as a table:
-- t (running total), g (generation, nil when the window does not exist),
-- th (the 'exhausted' mark, false when not set). Reads one HMGET; expiring
-- buckets costs one more HMGET, an HDEL and an HSET, once per bucket width.
local function advance(L, now, write)
  local v = redis.call('HMGET', L.key, 't', 'o', 'g', 'th')
  local state = {t = tonumber(v[1]) or 0, g = v[3] or nil, th = v[4]}
  local o = tonumber(v[2])
  if L.w == 0 or o == nil then return state end
  local first = math.floor(now / bucket_width(L)) - L.n
  if o >= first then return state end
  local dead = {}
  for i = o, math.min(first - 1, o + L.n) do dead[#dead + 1] = 'b' .. i end
  local amounts = redis.call('HMGET', L.key, unpack(dead))
  for _, b in ipairs(amounts) do
    if b then state.t = state.t - tonumber(b) end
  end
  if write then
    redis.call('HDEL', L.key, unpack(dead))
    redis.call('HSET', L.key, 't', fmt(state.t), 'o', fmt(first))
  end
  return state
end

-- Charge `amt` to the current bucket of a window whose state `advance` just
-- read. Returns the bucket index, the window generation (settle() needs both
-- to find the bucket again) and the new total. The key's TTL is set when a
-- bucket is born: it then outlives every bucket of the window.
local function charge(L, state, amt, now, agent)
  local idx = 0
  if L.w > 0 then idx = math.floor(now / bucket_width(L)) end
  local gen = state.g
  if gen == nil then
    gen = fmt(now)
    if L.w > 0 then
      redis.call('HSET', L.key, 'g', gen, 'o', fmt(idx))
    else
      redis.call('HSET', L.key, 'g', gen)
    end
    if agent ~= '' and L.scope ~= 'T' then redis.call('SADD', B .. ':agents', agent) end
    state.g = gen
  end
  if L.w > 0 then
    if redis.call('HINCRBY', L.key, 'b' .. idx, fmt(amt)) == amt then
      redis.call('PEXPIRE', L.key, (L.n + 2) * bucket_width(L))
    end
  end
  local t = redis.call('HINCRBY', L.key, 't', fmt(amt))
  state.t = t
  return idx, gen, t
end

-- Apply `dt` to the bucket a reservation was charged to (a settlement). A
-- bucket that already left the window, or a window reset since (another
-- generation), is left alone. Returns true when the adjustment was applied.
local function adjust(L, gen, idx, dt, now)
  local state = advance(L, now, true)
  if state.g == nil or state.g ~= gen then return false end
  if L.w > 0 and idx < math.floor(now / bucket_width(L)) - L.n then return false end
  if dt ~= 0 then
    if L.w > 0 then redis.call('HINCRBY', L.key, 'b' .. idx, fmt(dt)) end
    redis.call('HINCRBY', L.key, 't', fmt(dt))
  end
  return true
end

-- Is anyone queued? Lets the common case (no waiters) skip every queue lookup.
local function anyone_waiting()
  return redis.call('EXISTS', B .. ':qexp') == 1
end

-- The earliest time at which `need` units of the window will have expired;
-- nil for a lifetime limit (only a settlement or a reset frees it).
local function refill_at(L, need, now)
  if L.w == 0 then return nil end
  local width = bucket_width(L)
  local cur = math.floor(now / width)
  local fields = {}
  for i = cur - L.n, cur do fields[#fields + 1] = 'b' .. i end
  local buckets = redis.call('HMGET', L.key, unpack(fields))  -- one command, not one per bucket
  local freed = 0
  for k, b in ipairs(buckets) do
    if b then
      freed = freed + tonumber(b)
      -- bucket i = cur - n + k - 1 leaves the window at (i + n + 1) * width
      if freed >= need then return (cur + k) * width end
    end
  end
  return (cur + L.n + 1) * width
end

-- Announce the thresholds (50/75/90/100 % of the amount) that the window's
-- total crossed on its way up from `before` to `t`: each level once per
-- crossing, so a window that slid (or was refunded) back below a level
-- announces it again when it next rises past it.
local function thresholds(L, before, t, agent)
  if L.a == nil or L.a <= 0 then return end
  for _, th in ipairs(THRESHOLDS) do
    if before * 100 < th * L.a and t * 100 >= th * L.a then
      publish_event('threshold', {agent = agent, limit = L.lk, dimension = L.d,
                                  level = th, used = t, amount = L.a})
    end
  end
end

-- queue -------------------------------------------------------------------

local function queue_head(lk)
  local h = redis.call('ZRANGE', B .. ':b:' .. lk, 0, 0)
  return h[1]
end

-- Remove a ticket from the queue and from every blocked set it sits in; the
-- tickets that became the head of one of those sets are appended to `wake`.
local function drop_ticket(ticket, wake)
  local info = redis.call('HGET', B .. ':q', ticket)
  redis.call('HDEL', B .. ':q', ticket)
  redis.call('ZREM', B .. ':qexp', ticket)
  if not info then return end
  local parts = split(info, '|')
  for _, lk in ipairs(split(parts[3] or '', ' ')) do
    local was_head = queue_head(lk) == ticket
    redis.call('ZREM', B .. ':b:' .. lk, ticket)
    if was_head then
      local nxt = queue_head(lk)
      if nxt then wake[#wake + 1] = nxt end
    end
  end
end

local function purge_tickets(now, wake)
  local dead = redis.call('ZRANGEBYSCORE', B .. ':qexp', '-inf', now, 'LIMIT', 0, 64)
  for _, ticket in ipairs(dead) do drop_ticket(ticket, wake) end
end

-- Wake the head waiter of each limit in `lks`.
local function heads_of(lks, wake)
  if #lks == 0 or not anyone_waiting() then return end
  for _, lk in ipairs(lks) do
    local h = queue_head(lk)
    if h then wake[#wake + 1] = h end
  end
end

-- reservations --------------------------------------------------------------

-- A charge is "<LK>|<window_ms>|<generation>|<bucket>|<amount>", joined by ' '.
local function parse_charges(s)
  local out = {}
  for _, c in ipairs(split(s, ' ')) do
    local p = split(c, '|')
    local L = limit_from_charge(p[1], p[2])
    out[#out + 1] = {L = L, gen = p[3], idx = tonumber(p[4]), amt = tonumber(p[5])}
  end
  return out
end

local function parse_amounts(s)
  local out = {}
  for _, kv in ipairs(split(s, ' ')) do
    local k, v = string.match(kv, '^([%a_]+)=(-?%d+)$')
    out[k] = tonumber(v)
  end
  return out
end

-- Expire leases whose TTL ran out: the concurrency slot returns, the money
-- stays charged at the estimate (a dead worker may have spent it).
local function purge_leases(now, wake)
  local ids = redis.call('ZRANGEBYSCORE', B .. ':leases', '-inf', now, 'LIMIT', 0, 64)
  for _, id in ipairs(ids) do
    local key = B .. ':r:' .. id
    local rs = redis.call('HMGET', key, 'c', 'a')
    for _, c in ipairs(parse_charges(rs[1])) do
      if c.L.d == 'concurrency' and adjust(c.L, c.gen, c.idx, -c.amt, now) then
        heads_of({c.L.lk}, wake)
      end
    end
    redis.call('HSET', key, 's', 'expired')
    redis.call('PEXPIRE', key, 3600000)
    redis.call('ZREM', B .. ':leases', id)
    publish_event('lease_expired', {agent = rs[2] or '', reservation = id})
  end
end
