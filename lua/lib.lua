-- lib.lua: shared prelude, prepended (after a clock) to every script.
--
-- KEYS[1] of every script is the tenant base key, "<prefix>:{<tenant>}". Every
-- other key is derived from it, so all of one tenant's keys share one hash
-- tag and one cluster slot.
--
-- Key layout under base B (LK = limit key "<scope>:<dimension>:<window_ms>",
-- or "<scope>:<dimension>:<period>@<zone>" for a calendar period such as
-- "T:usd:month@Europe/Berlin"; scope "T" for the tenant, "A:<agent>" for one
-- agent, "M:<model>" for one model or "R:<run>" for the lifetime caps of one
-- run; a dimension is a built-in one or a custom name of letters and _):
--   B:limits        hash   "T" | "D" | "A:<agent>" | "M:<model>" -> JSON list of limits
--   B:agents        set    agents that ever had a window of their own
--   B:w:<LK>        hash   window: t (running total), o (oldest bucket index
--                          kept), g (generation), th (1 once 'exhausted' was
--                          announced, until the next admission), ov
--                          (overrun), b<i> buckets; a calendar period has
--                          no buckets: p and e (start and end of the
--                          period whose usage t holds, UTC ms)
--   B:b:<LK>        zset   waiters blocked on that limit, scored by queue rank
--   B:q             hash   ticket -> "score|created_ms|LK LK ..."
--   B:qexp          zset   ticket -> expiry of its place in the queue (ms, on
--                          the lease clock)
--   B:seq           string ticket sequence
--   B:r:<id>        hash   reservation not settled yet: s (state: open, or
--                          expired once its lease ran out), a (agent), m
--                          (model, when given), u (run id, when given), c
--                          (charges), e (estimates), t0 (admitted ms), x (lease
--                          expiry, on the lease clock like B:leases); open: no
--                          TTL; expired: EXPIRED_RECORD_TTL_MS
--   B:s:<id>        string a settled reservation (its tombstone, which
--                          replaces B:r:<id> at settlement): 1 committed, 2
--                          released; expires SETTLED_TTL_MS after settlement
--                          (see "reservation records" below)
--   B:leases        zset   open reservation id -> lease expiry on the lease
--                          clock (ms; see "clock" below: NOW - lease shift)
--   B:clock         hash   the tenant's clock: o (offset added to TIME, only
--                          grows), m (mark: the largest NOW a writing script
--                          served), s (lease shift, only grows), p (latest
--                          concurrency retry time promised, lease clock)
--   B:ledger        stream one entry per commit
--   B:run:<id>      hash   a run (see "runs" below): a (agent), c (caps, JSON
--                          like a scope of B:limits), t0 (start, NOW ms), dl
--                          (deadline ms, 0 for none), x (TTL in ms its keys get
--                          on every use), h (processes inside), n (steps:
--                          admissions), d:<dim> (committed), m|<model>|<dim>
--                          (committed per model); its caps' windows are
--                          B:w:R:<id>:<dim>:0, with the same TTL
--   B:trail         stream one entry per event (field "event": the JSON also
--                          published on B:events, which adds the entry's id as
--                          "id"), the last TRAIL_MAXLEN kept (exact trim)
--   B:admin         string last admin action; written first by set_limits and
--                          reset, so a worker ACL user is refused before any change
-- Channels: B:wake (tickets to retry, a ticket as "<ticket>@<ms>" to retry that
-- many ms from now, or "*" for all), B:events (JSON events).
--
-- Amounts are integers in the dimension's unit (usd in nano-dollars). Lua
-- numbers are doubles, exact to 2^53; they are written back with fmt().

-- The open tenant: its base key B and its keys and channels K (set by
-- open_tenant, at the end of this file, for KEYS[1] and, in a call that
-- serves several tenants, for each in turn: see "tenants" there).
local B, K
local function tenant_keys(base)
  -- slowburn_redis/keys.py names the same suffixes; tests/test_keys.py checks that they agree
  return {
    limits = base .. ':limits', agents = base .. ':agents', queue = base .. ':q', queue_expiry = base .. ':qexp',
    sequence = base .. ':seq', leases = base .. ':leases', ledger = base .. ':ledger', admin = base .. ':admin',
    clock = base .. ':clock', wake = base .. ':wake', events = base .. ':events', trail = base .. ':trail',
  }
end
local function window_key(lk) return B .. ':w:' .. lk end
local function blocked_key(lk) return B .. ':b:' .. lk end
local function reservation_key(id) return B .. ':r:' .. id end
local function settled_key(id) return B .. ':s:' .. id end
local function run_key(id) return B .. ':run:' .. id end

local BUCKETS = 60
local MAX_UNITS = 2 ^ 53 - 1        -- the largest integer a double holds exactly; no total goes past it
local RANK_SPAN = 2 ^ 44            -- queue ranks of one priority: (MAX_PRIORITY - priority) * RANK_SPAN + sequence
local MAX_PRIORITY = 100
local PURGE_BATCH = 64              -- expired leases or queue places dropped per script, at most (O(1) per call)
local EXPIRED_RECORD_TTL_MS = 3600000  -- an expired reservation's record is kept an hour (a late commit still lands)
local THRESHOLDS = {50, 75, 90, 100}

local function fmt(x) return string.format('%d', x) end

-- reservation records -------------------------------------------------------
--
-- An admission writes B:r:<id> (a hash of ~650 bytes: charges, estimates,
-- agent, model, run, times). It is needed while the reservation can still be
-- settled: while open, and for EXPIRED_RECORD_TTL_MS once its lease expired
-- (a late commit replaces the estimate that stayed charged). Settlement needs
-- none of it any more: settle_record replaces it by the tombstone B:s:<id>, a
-- string holding only the final state ('1' committed, '2' released: a small
-- integer, which Redis stores as a shared object), about 150 bytes with a
-- 40-character key name (~100 bytes + the key name, in steps of 16).
--
-- What reads a tombstone, and what it must get:
--   * a retried settle (commit or release, same id: a reply was lost and
--     slowburn_redis.resilience sent it again; or the release of an
--     interrupted acquire): {0, state}, exactly as a second settle got from
--     the settled record before, and nothing charged;
--   * a retried acquire of the id (a copy of an earlier attempt): admitted,
--     nothing charged, no lease, no queue place; its reply is {1, id, NOW,
--     NOW, ''} (the lease is over; nobody reads it: the acquire's caller
--     read its admission before it could settle);
--   * extend: {0, state}.
-- Without the tombstone (expired) a settle or an extend finds nothing and
-- answers {0, 'unknown'}, changing nothing: only its reply's state differs.
-- A copy of an acquire is the one thing that would charge again (a second
-- admission, charged at its estimate), so the tombstone must outlive every
-- copy of an acquire that can still be executed after the settlement. Every
-- acquire attempt is sent before its caller reads the admission, so before
-- any settle; a copy can run later only if its bytes were still on the way
-- when the client gave up that attempt and dropped its connection: TCP still
-- delivers them while the closed socket retransmits (Linux: 8 retries,
-- tcp_orphan_retries, with exponential backoff from the RTO, 200 ms at least:
-- about 100 s on a LAN, 8.5 min at a 1 s RTO), and a network holds a segment
-- at most its MSL (2 min). SETTLED_TTL_MS (10 min) covers that, and gives a
-- settle retried within 10 minutes of its first send (retry_timeout up to
-- 10 min) the true state.
local SETTLED_TTL_MS = 600000
local SETTLED_CODE = {committed = '1', released = '2'}
local SETTLED_STATE = {['1'] = 'committed', ['2'] = 'released'}

-- Settle the reservation `id` for good: its record gives way to its tombstone.
local function settle_record(id, state)
  redis.call('DEL', reservation_key(id))
  redis.call('SET', settled_key(id), SETTLED_CODE[state], 'PX', SETTLED_TTL_MS)
end

-- The state of the settled reservation `id` ('committed' or 'released'), or
-- nil when no tombstone is kept for it.
local function settled_state(id)
  local code = redis.call('GET', settled_key(id))
  return code and SETTLED_STATE[code] or nil
end

-- quote.lua sets this: queue_head, purge_leases and room_at then judge as a
-- writing script would, through the cache, and write nothing.
local READ_ONLY = false

-- clock ---------------------------------------------------------------------
--
-- NOW, the tenant's clock, never runs backward and never stands still. The
-- clock prelude's time_ms gives TIME_MS (the server's TIME, or the test clock); B:clock
-- keeps an offset o and a mark m (the largest NOW a writing script served):
--
--   NOW = TIME_MS + o,  and when that is below m (TIME stepped back: an NTP
--   step, a failover to a node with another clock), o grows by the step so
--   that NOW = m.
--
-- After a back step NOW goes on at TIME's rate from the mark, so windows
-- keep refilling at the true rate and a retry time (retry_at - NOW) is true
-- in real seconds; no bucket is ever charged below the window's oldest kept
-- index (time does not run backward, and `add` guards it as well), so every
-- charge ages out. The offset only grows, so after a back step the tenant's
-- clock (event and ledger timestamps) stays ahead of TIME by the step.
--
-- A forward step cannot be told from silence (no script of the tenant ran),
-- so windows take it: they count it as time that passed. Leases (and queue
-- places) are judged on the lease clock LEASE_NOW = NOW - s, which follows
-- NOW except that across one gap between two scripts it advances at most to
-- max(mark + CLOCK_JUMP_MS, p) on its own timeline, p being the latest
-- concurrency retry time acquire promised (so a client told "retry in X s"
-- finds the slot free at X s, however long X). The rest of the gap is added
-- to s. A clock step forward therefore frees only the slots due by then
-- (concurrency stays within its limit). The cost of a genuine silence: a
-- dead worker's lease ages at most CLOCK_JUMP_MS (or to the promise) per
-- silent gap, and fully while any waiter heartbeats. Shifting is O(1): the
-- lease scores are not rewritten.
--
-- A worker's script calls clock_commit() once (acquire not when every request
-- was refused for missing limits: such a tenant gets no key); reset and
-- set_limits compute NOW and store nothing (an admin action moves no mark); it
-- stores o, m and s and publishes a `clock_jump` event for a back step of
-- more than CLOCK_BACK_EVENT_MS, or a forward gap of more than CLOCK_JUMP_MS
-- while leases were open or waiters queued (an idle tenant's silence is not
-- announced). Status computes the same NOW, read-only, and writes nothing.
local CLOCK_JUMP_MS = 30000         -- a gap between two scripts of a tenant beyond this does not age leases
local CLOCK_BACK_EVENT_MS = 1000    -- a back step beyond this is announced
local TIME_MS                       -- the clock prelude's time (time_ms) for the open tenant
local CLOCK_OFFSET, CLOCK_MARK      -- o and m as read
local LEASE_SHIFT_BEFORE            -- s as read
local LEASE_SHIFT                   -- s from now on
local LEASE_PROMISE                 -- latest concurrency retry promised (lease clock)
local CLOCK_STEP                    -- the step seen: < 0 back, > CLOCK_JUMP_MS a forward jump, else 0
local NOW
local LEASE_NOW                     -- the lease clock: B:leases scores and reservations' x are on it

-- Read the open tenant's clock and compute NOW and LEASE_NOW (open_tenant).
local function read_clock()
  TIME_MS = time_ms(B)
  local saved = redis.call('HMGET', K.clock, 'o', 'm', 's', 'p')
  CLOCK_OFFSET = tonumber(saved[1]) or 0
  CLOCK_MARK = tonumber(saved[2])
  LEASE_SHIFT_BEFORE = tonumber(saved[3]) or 0
  LEASE_SHIFT = LEASE_SHIFT_BEFORE
  LEASE_PROMISE = tonumber(saved[4]) or 0
  CLOCK_STEP = 0
  NOW = TIME_MS + CLOCK_OFFSET
  if CLOCK_MARK ~= nil then
    if NOW < CLOCK_MARK then
      CLOCK_STEP = NOW - CLOCK_MARK
      CLOCK_OFFSET = CLOCK_OFFSET + CLOCK_MARK - NOW
      NOW = CLOCK_MARK
    elseif NOW - CLOCK_MARK > CLOCK_JUMP_MS then
      CLOCK_STEP = NOW - CLOCK_MARK
      local allowed = math.max(CLOCK_MARK - LEASE_SHIFT + CLOCK_JUMP_MS, LEASE_PROMISE)
      if NOW - LEASE_SHIFT > allowed then LEASE_SHIFT = NOW - allowed end
    end
  end
  LEASE_NOW = NOW - LEASE_SHIFT
end

local function split(s, sep)
  local out = {}
  if s == nil or s == '' then return out end
  for part in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = part end
  return out
end

-- Every event is appended to the durable trail B:trail and published on
-- B:events, in one step of the script: the published JSON is the entry's with
-- its stream id added ("id"), so a reader that replays the trail and then
-- follows the channel can drop what it already has (slowburn_redis/trail.py).
-- The trim is exact (fakeredis ignores MAXLEN ~) and drops one entry per event
-- once full: O(1).
local TRAIL_MAXLEN = 10000
local function publish_event(kind, fields)
  fields['type'] = kind
  fields['ts'] = NOW
  local body = cjson.encode(fields)
  local id = redis.call('XADD', K.trail, 'MAXLEN', TRAIL_MAXLEN, '*', 'event', body)
  redis.call('PUBLISH', K.events, '{"id":"' .. id .. '",' .. string.sub(body, 2))
  return id
end

-- Store the tenant's clock (see "clock" above) and announce a step; once per
-- writing script (later calls store the same values and announce nothing).
local function clock_commit()
  redis.call('HSET', K.clock, 'o', fmt(CLOCK_OFFSET), 'm', fmt(NOW), 's', fmt(LEASE_SHIFT), 'p', fmt(LEASE_PROMISE))
  if CLOCK_STEP == 0 then return end
  local step = CLOCK_STEP
  CLOCK_STEP = 0
  local leases = redis.call('ZCOUNT', K.leases, '(' .. fmt(CLOCK_MARK - LEASE_SHIFT_BEFORE), '+inf')
  local queued = redis.call('EXISTS', K.queue_expiry) == 1
  if step < -CLOCK_BACK_EVENT_MS or (step > 0 and (leases > 0 or queued)) then
    publish_event('clock_jump', {jump_ms = step, from_ms = CLOCK_MARK, leases = leases})
    redis.log(redis.LOG_WARNING, 'slowburn-redis: the clock of ' .. B .. ' saw a step of ' .. fmt(step)
      .. ' ms (TIME ' .. fmt(TIME_MS) .. ', mark ' .. fmt(CLOCK_MARK) .. '); ' .. fmt(leases) .. ' lease(s) in flight')
  end
end

local function publish_wake(tickets)
  if #tickets > 0 then redis.call('PUBLISH', K.wake, table.concat(tickets, ' ')) end
end

-- limits ------------------------------------------------------------------

local function decode_limits(json, scope)
  local out = {}
  if not json then return out end
  for _, spec in ipairs(cjson.decode(json)) do
    local lk = scope .. ':' .. spec.d .. ':' .. (spec.c and (spec.c .. '@' .. spec.z) or fmt(spec.w))
    out[#out + 1] = {lk = lk, key = window_key(lk), d = spec.d, a = spec.a, w = spec.w,
                     n = BUCKETS, scope = scope, cal = spec.c, offsets = spec.o}
  end
  return out
end

-- The run `id` as the scripts use it: its hash, caps (limits of scope
-- "R:<id>", each marked L.run), start, deadline and key TTL; `gone` when its
-- keys expired (or it never was).
local function run_state(id)
  local key = run_key(id)
  local v = redis.call('HMGET', key, 'c', 't0', 'dl', 'x')
  if not v[1] then return {id = id, key = key, gone = true, caps = {}} end
  local caps = decode_limits(v[1], 'R:' .. id)
  for _, L in ipairs(caps) do L.run = true end
  return {id = id, key = key, caps = caps, t0 = tonumber(v[2]), dl = tonumber(v[3]) or 0, ttl = tonumber(v[4])}
end

-- The limits that apply to one agent ('' for none) calling one model ('' for
-- none): the tenant's, then the agent's own or, when it has none, the
-- tenant's default for every agent, then the model's (scope "M:<model>",
-- tenant-wide), then the caps of run `run` (nil or '' for none; `out.run` is
-- its run_state). `out.stored` is false when neither the tenant's nor the
-- agent's scopes are stored: absence is not permission (an explicitly
-- unlimited tenant stores T as '[]'); a model's limits only add to those.
local function applicable_limits(agent, model, run)
  local out = {}
  local cfg = redis.call('HMGET', K.limits, 'T', 'A:' .. agent, 'D', 'M:' .. (model or ''))
  out.stored = (cfg[1] or (agent ~= '' and (cfg[2] or cfg[3]))) and true or false
  for _, L in ipairs(decode_limits(cfg[1], 'T')) do out[#out + 1] = L end
  if agent ~= '' then
    local own = cfg[2]
    if not own then own = cfg[3] end
    for _, L in ipairs(decode_limits(own, 'A:' .. agent)) do out[#out + 1] = L end
  end
  if model and model ~= '' then
    for _, L in ipairs(decode_limits(cfg[4], 'M:' .. model)) do out[#out + 1] = L end
  end
  if run and run ~= '' then
    out.run = run_state(run)
    for _, L in ipairs(out.run.caps) do out[#out + 1] = L end
  end
  return out
end

-- The models that have limits of their own (fields "M:<model>" of B:limits), sorted.
local function limited_models()
  local out = {}
  for _, field in ipairs(redis.call('HKEYS', K.limits)) do
    if string.sub(field, 1, 2) == 'M:' then out[#out + 1] = string.sub(field, 3) end
  end
  table.sort(out)
  return out
end

-- `applicable_limits`, read once per agent and model for the rest of the
-- script; only for scripts that do not change limits.
local function limits_memo()
  local memo = {}
  return function(agent, model, run)
    local id = agent .. ' ' .. (model or '') .. ' ' .. (run or '')
    local found = memo[id]
    if found == nil then
      found = applicable_limits(agent, model, run)
      memo[id] = found
    end
    return found
  end
end

-- calendar periods ----------------------------------------------------------
--
-- A calendar limit (L.cal 'day', 'week' or 'month'; L.w 0) carries its zone's
-- offset table (L.offsets, from the stored limits: {off0, t1, off1, t2, off2, ...}
-- in ms, offset off_i from UTC instant t_i on; the last holds for ever after,
-- the first before t1), computed by slowburn_redis/periods.py at set_limits
-- time. period_bounds mirrors periods.period_bounds line by line: the period
-- of an instant is the local day, ISO week or month holding its wall time,
-- from the earliest instant the wall time stayed in it to the first instant
-- it leaves it. A limit key from a charge (parse_charges) has no table: its
-- window is judged by the p and e it stored.
local DAY_MS = 86400000

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (m <= 2 and 1 or 0), m
end

-- The local start and end (ms of wall time since 1970-01-01) of the period holding wall time `t`.
local function local_period(kind, t)
  local day = math.floor(t / DAY_MS)
  if kind == 'day' then return day * DAY_MS, (day + 1) * DAY_MS end
  if kind == 'week' then
    local first = day - (day + 3) % 7  -- 1970-01-01 was a Thursday; ISO weeks start on Monday
    return first * DAY_MS, (first + 7) * DAY_MS
  end
  local y, m = civil_from_days(day)
  local ny, nm = y, m + 1
  if m == 12 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS
end

-- The UTC start and end (ms) of the period of kind `kind` holding instant `at`, by offset table `o`.
local function period_bounds(kind, o, at)
  local last = math.floor(#o / 2)
  local i = 0
  while 2 * i + 2 <= #o and o[2 * i + 2] <= at do i = i + 1 end
  local low, high = local_period(kind, at + o[2 * i + 1])
  local j, start = i, low - o[2 * i + 1]
  while j > 0 and start <= o[2 * j] do
    local before = o[2 * j] + o[2 * j - 1] - 1
    if before < low or before >= high then
      start = o[2 * j]
      break
    end
    j = j - 1
    start = low - o[2 * j + 1]
  end
  local k, finish = i, high - o[2 * i + 1]
  while k < last and finish >= o[2 * k + 2] do
    local after = o[2 * k + 2] + o[2 * k + 3]
    if after < low or after >= high then
      finish = o[2 * k + 2]
      break
    end
    k = k + 1
    finish = high - o[2 * k + 1]
  end
  return start, finish
end

-- The current period (start, end at NOW) of a calendar limit with its table, once per script.
local function current_period(L)
  if L.ps == nil then L.ps, L.pe = period_bounds(L.cal, L.offsets, NOW) end
  return L.ps, L.pe
end

-- windows -----------------------------------------------------------------

local function bucket_width(L) return math.ceil(L.w / L.n) end

-- Windows are read through a cache: a script reads each window it touches
-- once (one HMGET of its state and current bucket) and writes it once, in
-- flush_writes(), so a batch of requests costs one read and one write per
-- window, not one per request. Every script that changes windows or leases
-- (through advance, charge, adjust, set_mark, add_lease, drop_lease or
-- purge_leases) calls flush_writes() before it returns; status reads
-- through the cache and never flushes.
--
-- A cached window: L, t (running total), o (oldest bucket index kept; nil
-- for a lifetime limit or a window not yet born), g (generation, nil when the
-- window does not exist), th (the 'exhausted' mark), cur (the current bucket
-- index) and cur_s (the same as a string), b (bucket index -> amount, false
-- when known to be empty), dirty (the fields to write: 't', 'o', 'g', 'th' or
-- a bucket index), ttl (a bucket was born: refresh the key's TTL). A
-- calendar window also has p and e (its period, nil before its first charge);
-- its cur is the period start once charged.
local cached, cache_order  -- (open_tenant empties them for each tenant)

local function window(L)
  local w = cached[L.key]
  if w then return w end
  local cur = L.w > 0 and math.floor(NOW / bucket_width(L)) or 0
  local cur_s = fmt(cur)
  local v = redis.call('HMGET', L.key, 't', 'o', 'g', 'th', 'b' .. cur_s)
  w = {L = L, t = tonumber(v[1]) or 0, o = tonumber(v[2]), g = v[3] or nil, th = v[4] or nil,
       cur = cur, cur_s = cur_s, b = {[cur] = tonumber(v[5]) or false}, dirty = {}, ttl = false}
  if L.cal then
    local pe = redis.call('HMGET', L.key, 'p', 'e')
    w.p, w.e = tonumber(pe[1]), tonumber(pe[2])
  end
  cached[L.key] = w
  cache_order[#cache_order + 1] = w
  return w
end

-- The amounts of buckets `from`..`to` of a cached window (0 when empty), read
-- from Redis in one HMGET for those not cached yet.
local function buckets(w, from, to)
  local missing, fields = {}, {}
  for i = from, to do
    if w.b[i] == nil then
      missing[#missing + 1] = i
      fields[#fields + 1] = 'b' .. i
    end
  end
  if #fields > 0 then
    local v = redis.call('HMGET', w.L.key, unpack(fields))
    for k, i in ipairs(missing) do w.b[i] = tonumber(v[k]) or false end
  end
  local out = {}
  for i = from, to do out[#out + 1] = w.b[i] or 0 end
  return out
end

-- Set (value '1') or clear (nil) the window's 'exhausted' mark.
local function set_mark(L, value)
  local w = window(L)
  w.th = value
  w.dirty.th = true
end

-- Leases are written like windows: one ZADD and one ZREM per script.
-- `expiry` is on the lease clock (LEASE_NOW + ttl).
local lease_adds, lease_drops  -- (emptied by open_tenant)
local function add_lease(id, expiry)
  lease_adds[#lease_adds + 1] = expiry
  lease_adds[#lease_adds + 1] = id
end
local function drop_lease(id) lease_drops[#lease_drops + 1] = id end

local function flush_leases()
  if #lease_adds > 0 then redis.call('ZADD', K.leases, unpack(lease_adds)) end
  if #lease_drops > 0 then redis.call('ZREM', K.leases, unpack(lease_drops)) end
  lease_adds, lease_drops = {}, {}
end

-- Write every changed window and lease: per window one HSET (and an HDEL
-- for dropped buckets or a cleared mark), and a TTL when a bucket was born
-- (the TTL then outlives every bucket of the window).
local function flush_writes()
  for _, w in ipairs(cache_order) do
    local put, del = {}, {}
    for field in pairs(w.dirty) do
      local name, value = field, nil
      if field == 't' then value = fmt(w.t)
      elseif field == 'o' then value = fmt(w.o)
      elseif field == 'g' then value = w.g
      elseif field == 'th' then value = w.th
      elseif field == 'cap' then name, value = 'cap', '1'
      elseif field == 'p' or field == 'e' then value = w[field] and fmt(w[field])
      elseif field == 'ov' then value = nil
      else
        name = 'b' .. field
        if w.b[field] then value = fmt(w.b[field]) end
      end
      if value then
        put[#put + 1] = name
        put[#put + 1] = value
      else
        del[#del + 1] = name
      end
    end
    if #del > 0 then redis.call('HDEL', w.L.key, unpack(del)) end
    if #put > 0 then redis.call('HSET', w.L.key, unpack(put)) end
    if w.ttl then
      -- a calendar window outlives its period by a day; a run's cap lives as long as the run (touch_run)
      local ttl = w.ttl_ms or (w.L.cal and w.e - NOW + DAY_MS or (w.L.n + 2) * bucket_width(w.L))
      redis.call('PEXPIRE', w.L.key, ttl)
    end
    w.dirty, w.ttl = {}, false
  end
  flush_leases()
end

-- The window of L with the buckets that left it dropped (each bucket is
-- dropped once, so the cost is O(1) amortized): its cached state, with
-- t, g and th as above.
-- A calendar window whose period ended (or, for a limit with its table, is
-- not the current one) starts over: usage, overrun, period and the
-- 'exhausted' mark are cleared, and the next charge opens the current period.
local function advance_period(L, w, now)
  if w.p == nil or (now < w.e and (L.offsets == nil or current_period(L) == w.p)) then return w end
  w.t, w.p, w.e, w.th = 0, nil, nil, nil
  w.dirty.t, w.dirty.p, w.dirty.e, w.dirty.th, w.dirty.ov = true, true, true, true, true
  return w
end

local function advance(L, now)
  local w = window(L)
  if L.w == 0 or w.o == nil then
    if L.cal then return advance_period(L, w, now) end
    return w
  end
  local first = math.floor(now / bucket_width(L)) - L.n
  if w.o >= first then return w end
  local last = math.min(first - 1, w.o + L.n)
  for k, amount in ipairs(buckets(w, w.o, last)) do
    local i = w.o + k - 1
    w.t = w.t - amount
    w.b[i] = false
    w.dirty[i] = true
  end
  w.o = first
  w.dirty.t, w.dirty.o = true, true
  return w
end

-- Add `amt` to bucket `idx` and to the running total of a window `advance`
-- returned. A new window gets its generation (and oldest bucket).
local function add(w, idx, amt, now)
  local L = w.L
  if w.t + amt > MAX_UNITS then
    -- No wraparound: a total is capped at MAX_UNITS (exact in a double, and
    -- above any limit), and the window records that it was capped.
    amt = MAX_UNITS - w.t
    w.capped = true
    w.dirty.cap = true
  end
  w.t = w.t + amt
  w.dirty.t = true
  if w.g == nil then
    -- Unique per tenant (not the clock: a window deleted and born again in the same
    -- millisecond must not let an old reservation settle against the new one).
    w.g = fmt(redis.call('INCR', K.sequence))
    w.dirty.g = true
    if L.w > 0 then
      w.o = idx
      w.dirty.o = true
    end
  end
  if L.cal then
    -- a calendar charge opens the current period (settlements only reach a window whose p is theirs)
    if w.p == nil then
      w.p, w.e = current_period(L)
      w.dirty.p, w.dirty.e, w.ttl = true, true, true
    end
    w.cur, w.cur_s = w.p, fmt(w.p)
  end
  if L.w > 0 then
    -- A bucket below the oldest kept index is never charged: `advance` would
    -- never subtract it. NOW never runs backward, so a charge to the current
    -- bucket cannot land there; a charge (never a settlement: `adjust` leaves
    -- such buckets alone) from state written by an older clock goes to the
    -- oldest kept bucket, and the total stays the sum of the kept buckets.
    if w.o ~= nil and idx < w.o then idx = w.o end
    if w.b[idx] == nil then buckets(w, idx, idx) end
    local before = w.b[idx]
    if not before then
      w.ttl = true
      before = 0
    end
    w.b[idx] = before + amt
    w.dirty[idx] = true
  end
end

-- Record `dt` units charged beyond the estimates on the window of L (capped, like totals).
local function add_overrun(L, dt)
  local w = cached[L.key]
  local ov = 0
  if w and w.dirty.ov then w.dirty.ov = nil  -- a calendar period that just started: the old overrun goes
  else ov = tonumber(redis.call('HGET', L.key, 'ov') or '0') end
  redis.call('HSET', L.key, 'ov', fmt(math.min(ov + dt, MAX_UNITS)))
end

-- Charge `amt` to the current bucket of a window `advance` returned. Returns
-- the bucket index, the window generation (settle() needs both to find the
-- bucket again) and the new total. `now` must be the script's NOW (the
-- current bucket is cached).
local function charge(L, w, amt, now, agent)
  if w.g == nil and agent ~= '' and L.scope ~= 'T' and not L.run then redis.call('SADD', K.agents, agent) end
  add(w, w.cur, amt, now)
  return w.cur, w.g, w.t
end

-- Apply `dt` to the bucket a reservation was charged to (a settlement). A
-- bucket that already left the window, or a window reset since (another
-- generation), is left alone. Returns the window (as `advance` gives it), or
-- false when nothing was applied.
local function adjust(L, gen, idx, dt, now)
  local w = advance(L, now)
  if w.g == nil or w.g ~= gen then return false end
  if L.cal and idx ~= w.p then return false end  -- charged in an earlier period (or p gone: a new one)
  if L.w > 0 and (idx < math.floor(now / bucket_width(L)) - L.n or (w.o ~= nil and idx < w.o)) then
    return false
  end
  if dt ~= 0 then add(w, idx, dt, now) end
  return w
end

-- Is anyone queued? Lets the common case (no waiters) skip every queue lookup.
local function anyone_waiting()
  return redis.call('EXISTS', K.queue_expiry) == 1
end

-- The earliest time at which `need` units of the window will have expired;
-- for a calendar period, its end (exact); nil for a lifetime limit (only a
-- settlement or a reset frees it).
local function refill_at(L, need, now)
  if L.w == 0 then
    if not L.cal then return nil end
    local w = window(L)
    if w.e then return w.e end
    local _, finish = current_period(L)
    return finish
  end
  local width = bucket_width(L)
  local cur = math.floor(now / width)
  local freed = 0
  for k, amount in ipairs(buckets(window(L), cur - L.n, cur)) do
    freed = freed + amount
    -- bucket i = cur - n + k - 1 leaves the window at (i + n + 1) * width
    if amount > 0 and freed >= need then return (cur + k) * width end
  end
  return (cur + L.n + 1) * width
end

-- Announce the thresholds (50/75/90/100 % of the amount) that the window's
-- total crossed on its way up from `before` to `t`: each level once per
-- crossing, so a window that slid (or was refunded) back below a level
-- announces it again when it next rises past it.
local function thresholds(L, before, t, agent)
  if L.a == nil or L.a <= 0 then return end
  if t * 100 < THRESHOLDS[1] * L.a or before * 100 >= THRESHOLDS[#THRESHOLDS] * L.a then return end
  for _, th in ipairs(THRESHOLDS) do
    if before * 100 < th * L.a and t * 100 >= th * L.a then
      publish_event('threshold', {agent = agent, limit = L.lk, dimension = L.d,
                                  level = th, used = t, amount = L.a})
    end
  end
end

-- queue -------------------------------------------------------------------

local drop_ticket_later  -- expired heads met by queue_head, dropped whole by purge_met_tickets (open_tenant)

-- A queue record (the value of a ticket in K.queue) is
-- "<rank>|<created_ms>|<LK> <LK> ...|<at> <at> ...": the waiter's rank in every
-- blocked set, when it first queued, the limits it waits on and, for each, when
-- (NOW) that limit's first unit returns if it had none left at the waiter's
-- last denial (0: it had some, or waits on an earlier waiter there).
local function parse_queue_record(text)
  local rank, created, lks, ats = string.match(text, '^([^|]*)|([^|]*)|?([^|]*)|?(.*)$')
  local record = {rank = tonumber(rank), created = tonumber(created), lks = split(lks or '', ' '), spent_at = {}}
  for i, at in ipairs(split(ats or '', ' ')) do
    if record.lks[i] then record.spent_at[record.lks[i]] = tonumber(at) end
  end
  return record
end

local function queue_record(rank, created, lks, spent_at)
  local ats = {}
  for i, lk in ipairs(lks) do ats[i] = fmt(spent_at and spent_at[lk] or 0) end
  return fmt(rank) .. '|' .. fmt(created) .. '|' .. table.concat(lks, ' ') .. '|' .. table.concat(ats, ' ')
end

-- The first live waiter blocked on `lk` and its rank. The queue heals itself:
-- a head whose queue record is gone (a ghost) or whose place expired is
-- dropped here, by the first script that meets it, so nothing outside the
-- library's own bookkeeping can hold a queue up.
-- A script asks for the same heads several times (check, then drop_ticket
-- when it admits): the answer is kept per limit until the script changes that
-- queue (forget_head), so a repeated question costs no command.
local head_memo  -- lk -> {ticket, rank}, or false for an empty queue (emptied by open_tenant)

local function forget_head(lk) head_memo[lk] = nil end

local function queue_head_uncached(lk)
  local key = blocked_key(lk)
  local skipped = 0  -- dead heads passed over without dropping them (READ_ONLY)
  for _ = 1, PURGE_BATCH do
    local head = redis.call('ZRANGE', key, skipped, skipped, 'WITHSCORES')
    local ticket = head[1]
    if not ticket then return nil end
    local expiry = redis.call('ZSCORE', K.queue_expiry, ticket)
    if expiry and tonumber(expiry) > LEASE_NOW and redis.call('HEXISTS', K.queue, ticket) == 1 then
      return ticket, tonumber(head[2])
    end
    if READ_ONLY then
      skipped = skipped + 1
    else
      redis.call('ZREM', key, ticket)
      if expiry then drop_ticket_later[#drop_ticket_later + 1] = ticket end
    end
  end
  return nil
end

local function queue_head(lk)
  local memo = head_memo[lk]
  if memo == nil then
    local ticket, rank = queue_head_uncached(lk)
    memo = ticket and {ticket, rank} or false
    head_memo[lk] = memo
  end
  if memo then return memo[1], memo[2] end
  return nil
end

-- Remove a ticket from the queue and from every blocked set it sits in; the
-- tickets that became the head of one of those sets are appended to `wake`.
-- `record` is the ticket's parsed queue record when the caller read it already.
-- `full_at` maps a limit key that has no unit left to the time (NOW) its first
-- unit returns: the new head of that queue is woken then, not now
-- ("<ticket>@<ms from now>" in `wake`), since it could only be denied now.
-- Without it (a waiter leaves, or its place expired), the record's spent_at
-- says the same while it lies ahead: nothing but time frees a spent limit,
-- and a refund meanwhile wakes the head itself (heads_of).
local function drop_ticket(ticket, wake, record, full_at)
  if not record then
    local info = redis.call('HGET', K.queue, ticket)
    record = info and parse_queue_record(info)
  end
  full_at = full_at or (record and record.spent_at)
  local lks = record and record.lks or {}
  local was_head = {}
  for _, lk in ipairs(lks) do  -- before the record goes, while queue_head still counts it as live
    local memo = head_memo[lk]
    if memo and memo[1] == ticket then
      was_head[lk] = true
    else
      local first = redis.call('ZRANGE', blocked_key(lk), 0, 0)[1]
      was_head[lk] = first == ticket or queue_head(lk) == ticket  -- an expired head counts too
    end
  end
  redis.call('HDEL', K.queue, ticket)
  redis.call('ZREM', K.queue_expiry, ticket)
  for lk, memo in pairs(head_memo) do  -- a head it was, wherever it stood, is no longer live
    if memo and memo[1] == ticket then head_memo[lk] = nil end
  end
  for _, lk in ipairs(lks) do
    redis.call('ZREM', blocked_key(lk), ticket)
    forget_head(lk)
    if was_head[lk] then
      local nxt = queue_head(lk)
      local at = full_at and full_at[lk]
      if nxt and at and at > NOW then
        wake[#wake + 1] = nxt .. '@' .. fmt(at - NOW)
      elseif nxt then
        wake[#wake + 1] = nxt
      end
    end
  end
end

-- Drop the expired tickets queue_head met (from every queue they sat in).
local function purge_met_tickets(wake)
  while #drop_ticket_later > 0 do drop_ticket(table.remove(drop_ticket_later), wake) end
end

-- Drop queue places whose expiry passed on the lease clock (`now` is LEASE_NOW).
local function purge_tickets(now, wake)
  local dead = redis.call('ZRANGEBYSCORE', K.queue_expiry, '-inf', now, 'LIMIT', 0, PURGE_BATCH)
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

-- A charge is "<LK>|<window_ms>|<generation>|<bucket>|<amount>", joined by ' '
-- (LK = "<scope>:<dimension>:<window_ms>", or "...:<period>@<zone>" with
-- window_ms 0 and bucket = the period start, for a calendar period). String building and parsing is
-- most of a script's cost, so one pattern reads a charge and each limit key
-- is taken apart once per script.
local charged_limits  -- lk -> L, per tenant (open_tenant)
local function parse_charges(s)
  local out = {}
  if not s then return out end
  for lk, gen, idx, amt in string.gmatch(s, '([^ |]+)|%d+|(%d+)|(%-?%d+)|(%d+)') do
    local L = charged_limits[lk]
    if L == nil then
      local scope, dim, w = string.match(lk, '^(.*):([%a_]+):([^:]+)$')
      L = {lk = lk, key = window_key(lk), d = dim, w = tonumber(w) or 0, n = BUCKETS, scope = scope,
           cal = not tonumber(w) and string.match(w, '^(%a+)@') or nil}
      charged_limits[lk] = L
    end
    out[#out + 1] = {L = L, gen = gen, idx = tonumber(idx), amt = tonumber(amt)}
  end
  return out
end

-- "dim=int dim=int ..." -> {dim = int, ...}
local function parse_amounts(s)
  local out = {}
  for k, v in string.gmatch(s, '([%a_]+)=(-?%d+)') do
    local n = tonumber(v)
    if n > MAX_UNITS or n < -MAX_UNITS then
      error({err = 'ERR amount out of range: ' .. k .. '=' .. v .. ' (at most 2^53-1 units)'})
    end
    out[k] = n
  end
  return out
end

-- Expire leases whose TTL ran out on the lease clock (`lease_now` is
-- LEASE_NOW): the concurrency slot returns, the money stays charged at the
-- estimate (a dead worker may have spent it). `now` is NOW, for the windows.
local function purge_leases(now, lease_now, wake)
  local ids = redis.call('ZRANGEBYSCORE', K.leases, '-inf', lease_now, 'LIMIT', 0, PURGE_BATCH)
  for _, id in ipairs(ids) do
    local key = reservation_key(id)
    local rs = redis.call('HMGET', key, 'c', 'a')
    for _, c in ipairs(parse_charges(rs[1])) do
      if c.L.d == 'concurrency' and adjust(c.L, c.gen, c.idx, -c.amt, now) then
        heads_of({c.L.lk}, wake)
      end
    end
    if not READ_ONLY then
      redis.call('HSET', key, 's', 'expired')
      redis.call('PEXPIRE', key, EXPIRED_RECORD_TTL_MS)
      drop_lease(id)
      publish_event('lease_expired', {agent = rs[2] or '', reservation = id})
    end
  end
end

-- runs ----------------------------------------------------------------------
--
-- A run (slowburn_redis/runs.py) is a short-lived scope of lifetime caps: a
-- request that names it is charged to its caps too, in the same script call,
-- all or nothing. A cap never refills, so a request that does not fit is not
-- queued: acquire answers {-3, ...} at once, before any queue is looked at.
-- Every key of a run expires x ms after its last use (run.lua sets x: the
-- run's max_seconds and a margin while it is open, a short grace once every
-- process left it).

-- The acquire reply for a request the run `run` (run_state) cannot take, or
-- nil and the caps it needs: {-3, reason, limit_key, limit_amount, used, requested}
-- with reason 'cap' (a cap is spent), 'time' (max_seconds passed: amounts in
-- ms) or 'gone' (its keys expired). Advisory mode charges the caps whatever
-- they say (the exceeded ones go into `over`), except for a run gone.
local function run_verdict(run, amounts, mode, over)
  local lk = 'R:' .. run.id
  if run.gone then return nil, {-3, 'gone', lk, 0, 0, 0} end
  if run.dl > 0 and NOW >= run.dl and mode ~= 'advisory' then
    return nil, {-3, 'time', lk, run.dl - run.t0, NOW - run.t0, 0}
  end
  local needed = {}
  for _, L in ipairs(run.caps) do
    local amt = amounts[L.d] or 0
    if amt > 0 then
      local w = advance(L, NOW)
      if w.t + amt > L.a then
        if mode ~= 'advisory' then return nil, {-3, 'cap', L.lk, L.a, w.t, amt} end
        over[#over + 1] = L.lk
      end
      needed[#needed + 1] = {L = L, amt = amt, state = w}
    end
  end
  return needed
end

-- The run was used: its keys live another x ms (the windows' TTL is set when they are written).
local function touch_run(run)
  if run.gone then return end
  redis.call('PEXPIRE', run.key, run.ttl)
  for _, L in ipairs(run.caps) do
    local w = window(L)
    w.ttl_ms, w.ttl = run.ttl, true
  end
end

-- Count a commit's final amounts on the run, per dimension and per model.
local function run_committed(run, final, model)
  if run.gone then return end
  for dim, v in pairs(final) do
    if dim ~= 'concurrency' and v ~= 0 then
      redis.call('HINCRBY', run.key, 'd:' .. dim, v)
      redis.call('HINCRBY', run.key, 'm|' .. model .. '|' .. dim, v)
    end
  end
end

-- verdict (acquire and quote) -------------------------------------------------

-- The limits among `limits` (applicable_limits) that `amounts` needs, or the
-- acquire reply for a request that can never fit: {-1, limit_key, amount, requested}.
local function needs(limits, amounts, mode)
  local needed = {}
  for _, L in ipairs(limits) do
    local amt = amounts[L.d] or 0
    if amt > 0 and not L.run then  -- a run's caps are judged by run_verdict, never queued on
      if amt > L.a and mode ~= 'advisory' then return nil, {-1, L.lk, L.a, amt} end
      needed[#needed + 1] = {L = L, amt = amt}
    end
  end
  return needed
end

-- When (NOW) a limit that is full, at total `t`, will have room for `amt`
-- units again (default: the request's n.amt; 1: when its first unit returns);
-- nil for never by itself. A concurrency slot returns when the soonest lease
-- expires (on the lease clock, which runs with NOW: the expiry on NOW's
-- timeline is score + LEASE_SHIFT), whatever the amount.
local function room_at(n, t, amt)
  if n.L.d == 'concurrency' then
    local soonest
    if READ_ONLY then  -- expired leases stay in the set: the soonest one still running
      soonest = redis.call('ZRANGEBYSCORE', K.leases, '(' .. fmt(LEASE_NOW), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    else
      flush_leases()
      soonest = redis.call('ZRANGE', K.leases, 0, 0, 'WITHSCORES')
    end
    return soonest[2] and tonumber(soonest[2]) + LEASE_SHIFT or nil
  end
  return refill_at(n.L, t + (amt or n.amt) - n.L.a, NOW)
end

-- Check every needed limit for capacity and for earlier waiters (`waiting`:
-- anyone is queued); returns the verdict: blocked limit keys (empty: admit),
-- the limits out of capacity, the retry time, the first limit and why, the
-- limits passed in advisory mode, and `behind`: an earlier waiter stands
-- ahead of this request in one of its queues (a queued waiter then retries
-- only when a notification names it: see enqueue). It charges nothing:
-- windows are only read through the cache (advance); a lease retry time
-- becomes a promise (LEASE_PROMISE) that only a writing script stores.
local function check(needed, mode, ticket, rank, waiting)
  local v = {blocked = {}, full = {}, retry_at = 0, forever = false, first = '', first_amount = 0, reason = '',
             over = {}, behind = false, spent_at = {}}
  for _, n in ipairs(needed) do
    n.state = advance(n.L, NOW)
    local t = n.state.t
    n.t, n.exhausted = t, n.state.th
    local full = t + n.amt > n.L.a
    local behind = false
    if mode ~= 'advisory' and waiting then
      local head, head_rank = queue_head(n.L.lk)
      behind = head ~= nil and head ~= ticket and head_rank < rank
    elseif full then
      v.over[#v.over + 1] = n.L.lk
    end
    if behind then v.behind = true end
    if mode ~= 'advisory' and (full or behind) then
      v.blocked[#v.blocked + 1] = n.L.lk
      if v.first == '' or (full and v.reason ~= 'capacity') then
        v.first, v.first_amount, v.reason = n.L.lk, n.L.a, full and 'capacity' or 'queue'
      end
      if full then
        v.full[#v.full + 1] = n
        local at = room_at(n, t)
        if t >= n.L.a then  -- not one unit left: when the first returns (drop_ticket's timed wakes)
          local first = at  -- the same answer, unless a window request asks for more than one unit
          if n.L.d ~= 'concurrency' and n.amt ~= 1 then first = room_at(n, t, 1) end
          if first then v.spent_at[n.L.lk] = first end
        end
        if at then v.retry_at = math.max(v.retry_at, at) else v.forever = true end
        if at and n.L.d == 'concurrency' then v.lease_at = at end
      else
        v.forever = true
      end
    end
  end
  if v.forever then v.retry_at = -1 end
  -- A retry time set by a lease is a promise the lease clock keeps across a gap (lib.lua, clock).
  if v.lease_at and v.retry_at == v.lease_at then
    LEASE_PROMISE = math.max(LEASE_PROMISE, v.lease_at - LEASE_SHIFT)
  end
  return v
end

-- tenants -------------------------------------------------------------------
--
-- Every script serves the tenant of KEYS[1], opened below. The batched
-- scripts (acquire, settle, leave) also serve several tenants in one call, so
-- that the work every call does first (this library's set-up, the script's
-- start-up) is paid once for them all: KEYS[i] is the i-th tenant's base key
-- and, with more than one key, ARGV[1] is "n1 n2 ..." (how many of the
-- arguments that follow are the i-th tenant's, in KEYS order). serve_tenants
-- opens each tenant in turn (its clock, keys and caches are its own, as in a
-- call of its own) and the reply is every tenant's replies, in order. On a
-- Redis Cluster the keys of one call share a slot, so there a call serves one
-- tenant.

-- Make `base` the open tenant: its keys, its clock, empty caches.
local function open_tenant(base)
  B, K = base, tenant_keys(base)
  read_clock()
  cached, cache_order = {}, {}
  lease_adds, lease_drops = {}, {}
  drop_ticket_later, head_memo, charged_limits = {}, {}, {}
end

-- Run serve(first, last) for each tenant of the call with the range of ARGV
-- holding its arguments; the concatenation of the lists of replies it returns
-- (an error reply from serve is the call's reply).
local function serve_tenants(serve)
  if #KEYS == 1 then return serve(1, #ARGV) end
  local counts = split(ARGV[1] or '', ' ')
  local total = 0
  for i, n in ipairs(counts) do
    counts[i] = tonumber(n)
    if not counts[i] or counts[i] < 0 then counts = {} break end
    total = total + counts[i]
  end
  if #counts ~= #KEYS or total ~= #ARGV - 1 then
    return redis.error_reply('malformed tenant counts ' .. tostring(ARGV[1]) .. ' for ' .. #KEYS .. ' keys and '
      .. (#ARGV - 1) .. ' arguments')
  end
  local replies, first = {}, 2
  for i, base in ipairs(KEYS) do
    if i > 1 then open_tenant(base) end
    local out = serve(first, first + counts[i] - 1)
    if out.err then return out end
    for _, reply in ipairs(out) do replies[#replies + 1] = reply end
    first = first + counts[i]
  end
  return replies
end

open_tenant(KEYS[1])
