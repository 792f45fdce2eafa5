-- acquire.lua: reserve an estimate against every limit that applies, all or
-- nothing, in FIFO order (within a priority) behind earlier waiters.
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"; KEYS[2..] more tenants
--          served by the same call (lib.lua "tenants")
-- ARGV     one request per argument (a client sends the requests of one
--          tenant that are ready together as one batch; they run in order,
--          each all or nothing on its own); with several keys ARGV[1] says
--          how many requests are each tenant's. A request is one string of
--          fields joined by single spaces (names hold no spaces):
--   id        reservation id (client-made; a retried acquire with the same
--             id returns the first admission instead of charging twice; an
--             id settled less than 10 minutes ago, lib.lua "reservation
--             records", is admitted with now_ms = lease_expiry_ms = NOW and
--             charges nothing)
--   agent     '' for the tenant alone
--   model     '' for none; else the limits of scope "M:<model>" apply too
--   run       '' for none; else the run id: its caps (scope "R:<run>", in
--             B:run:<run>) are charged too, and never queued on
--   mode      'wait' (queue when denied), 'reject' (do not queue),
--             'advisory' (admit and charge whatever the limits say)
--   priority  an integer in [-100, 100], higher first
--   ticket    held from an earlier denial ('' for a first attempt); a ticket
--             is the reservation id of the request it queued
--   lease     lease TTL in ms
--   queue     TTL of a queue place in ms (the waiter's process refreshes it)
--   amounts   the rest of the string, "dim=int dim=int ..." (usd in
--             nano-dollars)
--
-- Reply: a list with one reply per request, in order (tenant after tenant), each one of:
--   {1, id, now_ms, lease_expiry_ms, over}    admitted; `over` is a space-joined list of
--                                             limit keys exceeded (advisory mode only);
--                                             lease_expiry_ms is on NOW's timeline
--   {0, ticket, now_ms, retry_at_ms, limit_key, reason, limit_amount}
--                                             denied; retry_at_ms (NOW's timeline, so
--                                             retry_at_ms - now_ms is true in seconds
--                                             of TIME) is -1 when only a
--                                             notification can help, or (wait mode)
--                                             when an earlier waiter stands ahead
--                                             in one of its queues; reason is
--                                             'capacity' or 'queue'; ticket is '' in
--                                             reject mode; limit_amount is the amount
--                                             of limit_key (in its units)
--   {-1, limit_key, limit_amount, requested}  the request exceeds the limit itself
--   {-2, agent}                               no limits are stored for the tenant, its
--                                             default agent or this agent: refused
--                                             (absence is not permission)
--   {-3, reason, limit_key, limit_amount, used, requested}
--                                             the run cannot take the request, and
--                                             never will: reason 'cap' (limit_key is
--                                             the run's cap "R:<run>:<dim>:0"), 'time'
--                                             (max_seconds passed; amounts in ms,
--                                             limit_key "R:<run>") or 'gone' (the
--                                             run's keys expired); judged before any
--                                             queue, so such a request never waits
--
-- Clock: stores each tenant's clock (clock_commit, lib.lua) unless every
-- request of that tenant was refused for missing limits, so such a tenant gets no key.

-- The open tenant's state for the script (set by open_acquire for each tenant
-- of the call): tickets to wake, whether anyone waits, its limits, and
-- whether any request found limits.
local wake, waiting, limits_of, stored_any

local function open_acquire()
  wake = {}
  purge_leases(NOW, LEASE_NOW, wake)
  waiting = anyone_waiting()
  if waiting then purge_tickets(LEASE_NOW, wake) end
  limits_of = limits_memo()
  stored_any = false  -- did any request find limits? A batch refused whole as missing stores nothing
end

-- The waiter's rank: kept from its queue record, or, for a newcomer, after
-- every waiter of its priority.
local function rank_of(ticket, priority)
  local record = ticket ~= '' and redis.call('HGET', K.queue, ticket) or false
  if record then return parse_queue_record(record), ticket end
  return nil, '', (MAX_PRIORITY - priority) * RANK_SPAN + RANK_SPAN - 1
end

-- Charge every needed limit, record the reservation and its lease, leave the queue.
local function admit(id, agent, model, needed, amounts_text, lease_ttl, ticket, record, over, run)
  local charges = {}
  local full_at = {}  -- limits this admission left without a unit: when the next head may retry
  for _, n in ipairs(run and run.needed or {}) do needed[#needed + 1] = n end
  for _, n in ipairs(needed) do
    local _, gen, t = charge(n.L, n.state, n.amt, NOW, agent)
    if t >= n.L.a then full_at[n.L.lk] = {n = n, t = t} end
    local prefix = n.L.charge_prefix  -- built once per limit per script
    if not prefix then
      prefix = n.L.lk .. '|' .. fmt(n.L.w) .. '|'
      n.L.charge_prefix = prefix
    end
    charges[#charges + 1] = prefix .. gen .. '|' .. n.state.cur_s .. '|' .. fmt(n.amt)
    thresholds(n.L, t - n.amt, t, agent)
    if n.exhausted then set_mark(n.L, nil) end  -- capacity returned: re-arm
  end
  local expiry = LEASE_NOW + lease_ttl
  local rkey = reservation_key(id)
  redis.call('HSET', rkey, 's', 'open', 'a', agent, 'c', table.concat(charges, ' '),
             'e', amounts_text, 't0', fmt(NOW), 'x', fmt(expiry))
  if model ~= '' then redis.call('HSET', rkey, 'm', model) end
  if run then
    redis.call('HSET', rkey, 'u', run.id)
    redis.call('HINCRBY', run.key, 'n', 1)
    touch_run(run)
  end
  add_lease(id, expiry)
  if ticket ~= '' then
    for lk, f in pairs(full_at) do  -- when its first unit returns (a concurrency slot: or a settle's wake)
      full_at[lk] = room_at(f.n, f.t, 1)
    end
    drop_ticket(ticket, wake, record, full_at)
    publish_event('resumed', {agent = agent, ticket = ticket, waited_ms = NOW - record.created})
  end
  return {1, id, NOW, expiry + LEASE_SHIFT, table.concat(over, ' ')}
end

-- Announce each limit that just ran out (once, until capacity returns).
local function announce_exhausted(full, agent)
  for _, n in ipairs(full) do
    if not n.exhausted then
      set_mark(n.L, '1')
      publish_event('exhausted', {agent = agent, limit = n.L.lk, dimension = n.L.d,
                                  used = n.t, amount = n.L.a, requested = n.amt})
    end
  end
end

-- Queue the waiter (a newcomer under its reservation id, so a client that never
-- read this reply can still give up the place) or move it to the limits it now waits on.
-- No stampede: only a waiter that stands first in every queue it joins gets a
-- retry time; one behind an earlier waiter gets -1 and sleeps until a
-- notification names it (drop_ticket wakes the next head when a head leaves
-- or is admitted), so a refill is retried by the queue heads alone, in order.
local function enqueue(id, agent, priority, ticket, record, queue_ttl, v)
  local rank, created
  if ticket == '' then
    ticket = id
    rank = (MAX_PRIORITY - priority) * RANK_SPAN + redis.call('INCR', K.sequence)
    created = NOW
    publish_event('waiting', {agent = agent, ticket = ticket, limit = v.first, reason = v.reason})
  else
    rank, created = record.rank, record.created
    local still = {}
    for _, lk in ipairs(v.blocked) do still[lk] = true end
    for _, lk in ipairs(record.lks) do
      if not still[lk] then
        local was_head = queue_head(lk) == ticket
        redis.call('ZREM', blocked_key(lk), ticket)
        forget_head(lk)
        if was_head then heads_of({lk}, wake) end
      end
    end
  end
  for _, lk in ipairs(v.blocked) do
    redis.call('ZADD', blocked_key(lk), rank, ticket)
    forget_head(lk)
  end
  redis.call('HSET', K.queue, ticket, queue_record(rank, created, v.blocked, v.spent_at))
  redis.call('ZADD', K.queue_expiry, LEASE_NOW + queue_ttl, ticket)
  waiting = true
  return {0, ticket, NOW, v.behind and -1 or v.retry_at, v.first, v.reason, v.first_amount}
end

-- Announce (once per run) that the run's caps or time are spent.
local function announce_run_spent(run, agent, reply)
  if run.gone or redis.call('HSETNX', run.key, 'ex', reply[2]) == 0 then return end
  publish_event('run_exhausted', {agent = agent, run = run.id, reason = reply[2], limit = reply[3],
                                  amount = reply[4], used = reply[5], requested = reply[6]})
end

-- The run's verdict on the request (nil when it names no run): the reply
-- refusing it, or nil and the run with the caps it needs (run.needed).
local function run_check(limits, amounts, mode, over)
  local run = limits.run
  if not run then return nil end
  local needed, spent = run_verdict(run, amounts, mode, over)
  if spent then return spent end
  run.needed = needed
  return nil, run
end

local function acquire(id, agent, model, run_id, mode, priority, ticket, lease_ttl, queue_ttl, amounts_text)
  -- A known id (a retry, or a copy of an earlier attempt) is never admitted twice: an open or
  -- expired reservation returns its admission, a settled one (its tombstone) charges nothing.
  if redis.call('EXISTS', reservation_key(id), settled_key(id)) > 0 then
    local existing = redis.call('HMGET', reservation_key(id), 't0', 'x')
    if existing[1] then return {1, id, tonumber(existing[1]), tonumber(existing[2]) + LEASE_SHIFT, ''} end
    if settled_state(id) then return {1, id, NOW, NOW, ''} end
  end
  local record, rank
  record, ticket, rank = rank_of(ticket, priority)
  if record then rank = record.rank end
  local limits = limits_of(agent, model, run_id)
  if not limits.stored then
    if ticket ~= '' then drop_ticket(ticket, wake) end
    return {-2, agent}
  end
  stored_any = true
  local amounts = parse_amounts(amounts_text)
  local run_over = {}
  local spent, run = run_check(limits, amounts, mode, run_over)
  local needed, too_large = needs(limits, amounts, mode)
  if spent or too_large then
    if ticket ~= '' then drop_ticket(ticket, wake) end
    if spent then announce_run_spent(limits.run, agent, spent) end
    return spent or too_large
  end
  local v = check(needed, mode, ticket, rank, waiting)
  for _, lk in ipairs(run_over) do v.over[#v.over + 1] = lk end
  if #v.blocked == 0 then return admit(id, agent, model, needed, amounts_text, lease_ttl, ticket, record, v.over, run) end
  announce_exhausted(v.full, agent)
  if mode ~= 'wait' then return {0, '', NOW, v.retry_at, v.first, v.reason, v.first_amount} end
  return enqueue(id, agent, priority, ticket, record, queue_ttl, v)
end

return serve_tenants(function(first, last)
  open_acquire()
  local replies = {}
  for i = first, last do
    local request = ARGV[i]
    local id, agent, model, run, mode, priority, ticket, lease_ttl, queue_ttl, amounts =
      string.match(request, '^(%S+) (%S*) (%S*) (%S*) (%S+) (%S+) (%S*) (%S+) (%S+) (.*)$')
    if not id then return redis.error_reply('malformed acquire request ' .. request) end
    replies[#replies + 1] = acquire(id, agent, model, run, mode, tonumber(priority), ticket, tonumber(lease_ttl),
                                    tonumber(queue_ttl), amounts)
  end
  purge_met_tickets(wake)
  if stored_any then clock_commit() end
  flush_writes()
  publish_wake(wake)
  return replies
end)
