-- acquire.lua: reserve an estimate against every limit that applies, all or
-- nothing, in FIFO order (within a priority) behind earlier waiters.
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV     one request per argument (a client sends the requests of one
--          tenant that are ready together as one batch; they run in order,
--          each all or nothing on its own). A request is one string of
--          fields joined by single spaces (names hold no spaces):
--   id        reservation id (client-made; a retried acquire with the same
--             id returns the first admission instead of charging twice)
--   agent     '' for the tenant alone
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
-- Reply: a list with one reply per request, in order, each one of:
--   {1, id, now_ms, lease_expiry_ms, over}    admitted; `over` is a space-joined list of
--                                             limit keys exceeded (advisory mode only)
--   {0, ticket, now_ms, retry_at_ms, limit_key, reason}
--                                             denied; retry_at_ms is -1 when only a
--                                             notification can help; reason is
--                                             'capacity' or 'queue'; ticket is '' in
--                                             reject mode
--   {-1, limit_key, limit_amount, requested}  the request exceeds the limit itself

local wake = {}
purge_leases(NOW, wake)
local waiting = anyone_waiting()
if waiting then purge_tickets(NOW, wake) end
local limits_of = limits_memo()

local function acquire(id, agent, mode, priority, ticket, lease_ttl, queue_ttl, amounts_text)
  local amounts = parse_amounts(amounts_text)
  local existing = redis.call('HMGET', B .. ':r:' .. id, 't0', 'x')
  if existing[1] then
    return {1, id, tonumber(existing[1]), tonumber(existing[2]), ''}
  end

  local queued = ticket ~= '' and redis.call('HGET', B .. ':q', ticket) or false
  local my_score
  if queued then
    my_score = tonumber(split(queued, '|')[1])
  else
    ticket = ''
    -- A newcomer ranks after every waiter of its priority.
    my_score = (100 - priority) * 2 ^ 44 + 2 ^ 44 - 1
  end

  local needed = {}
  for _, L in ipairs(limits_of(agent)) do
    local amt = amounts[L.d] or 0
    if amt > 0 then
      if amt > L.a and mode ~= 'advisory' then
        if ticket ~= '' then drop_ticket(ticket, wake) end
        return {-1, L.lk, L.a, amt}
      end
      needed[#needed + 1] = {L = L, amt = amt}
    end
  end

  local blocked, capacity_blocked = {}, {}
  local retry_at, wait_forever = 0, false
  local first_lk, reason = '', ''
  local over = {}
  for _, n in ipairs(needed) do
    n.state = advance(n.L, NOW)
    local t = n.state.t
    n.t, n.exhausted = t, n.state.th
    local full = t + n.amt > n.L.a
    local behind = false
    if mode ~= 'advisory' and waiting then
      local head = redis.call('ZRANGE', B .. ':b:' .. n.L.lk, 0, 0, 'WITHSCORES')
      behind = head[1] ~= nil and head[1] ~= ticket and tonumber(head[2]) < my_score
    elseif full then
      over[#over + 1] = n.L.lk
    end
    if mode ~= 'advisory' and (full or behind) then
      blocked[#blocked + 1] = n.L.lk
      if first_lk == '' or (full and reason ~= 'capacity') then
        first_lk = n.L.lk
        reason = full and 'capacity' or 'queue'
      end
      if full then
        capacity_blocked[#capacity_blocked + 1] = n
        local at
        if n.L.d == 'concurrency' then
          flush_leases()
          local soonest = redis.call('ZRANGE', B .. ':leases', 0, 0, 'WITHSCORES')
          if soonest[2] then at = tonumber(soonest[2]) + 1 end
        else
          at = refill_at(n.L, t + n.amt - n.L.a, NOW)
        end
        if at then retry_at = math.max(retry_at, at) else wait_forever = true end
      else
        wait_forever = true
      end
    end
  end

  if #blocked == 0 then
    local charges = {}
    for _, n in ipairs(needed) do
      local _, gen, t = charge(n.L, n.state, n.amt, NOW, agent)
      local prefix = n.L.charge_prefix  -- built once per limit per script
      if not prefix then
        prefix = n.L.lk .. '|' .. fmt(n.L.w) .. '|'
        n.L.charge_prefix = prefix
      end
      charges[#charges + 1] = prefix .. gen .. '|' .. n.state.cur_s .. '|' .. fmt(n.amt)
      thresholds(n.L, t - n.amt, t, agent)
      if n.exhausted then set_mark(n.L, nil) end  -- capacity returned: re-arm
    end
    local expiry = NOW + lease_ttl
    redis.call('HSET', B .. ':r:' .. id, 's', 'open', 'a', agent, 'c', table.concat(charges, ' '),
               'e', amounts_text, 't0', fmt(NOW), 'x', fmt(expiry))
    add_lease(id, expiry)
    if ticket ~= '' then
      local created = tonumber(split(queued, '|')[2])
      drop_ticket(ticket, wake)
      publish_event('resumed', {agent = agent, ticket = ticket, waited_ms = NOW - created})
    end
    return {1, id, NOW, expiry, table.concat(over, ' ')}
  end

  for _, n in ipairs(capacity_blocked) do
    if not n.exhausted then
      set_mark(n.L, '1')
      publish_event('exhausted', {agent = agent, limit = n.L.lk, dimension = n.L.d,
                                  used = n.t, amount = n.L.a, requested = n.amt})
    end
  end

  if wait_forever then retry_at = -1 end
  if mode ~= 'wait' then
    return {0, '', NOW, retry_at, first_lk, reason}
  end

  if ticket == '' then
    local seq = redis.call('INCR', B .. ':seq')
    -- The ticket is the reservation id, so a client that never read this reply
    -- (cancelled in flight) can still give up the place.
    ticket = id
    my_score = (100 - priority) * 2 ^ 44 + seq
    publish_event('waiting', {agent = agent, ticket = ticket, limit = first_lk, reason = reason})
    queued = fmt(my_score) .. '|' .. fmt(NOW) .. '|'
  else
    -- Leave the blocked sets this waiter no longer waits on.
    local still = {}
    for _, lk in ipairs(blocked) do still[lk] = true end
    for _, lk in ipairs(split(split(queued, '|')[3] or '', ' ')) do
      if not still[lk] then
        local was_head = queue_head(lk) == ticket
        redis.call('ZREM', B .. ':b:' .. lk, ticket)
        if was_head then heads_of({lk}, wake) end
      end
    end
  end
  local parts = split(queued, '|')
  for _, lk in ipairs(blocked) do redis.call('ZADD', B .. ':b:' .. lk, my_score, ticket) end
  redis.call('HSET', B .. ':q', ticket, parts[1] .. '|' .. parts[2] .. '|' .. table.concat(blocked, ' '))
  redis.call('ZADD', B .. ':qexp', NOW + queue_ttl, ticket)
  waiting = true
  return {0, ticket, NOW, retry_at, first_lk, reason}
end

local replies = {}
for _, request in ipairs(ARGV) do
  local id, agent, mode, priority, ticket, lease_ttl, queue_ttl, amounts =
    string.match(request, '^(%S+) (%S*) (%S+) (%S+) (%S*) (%S+) (%S+) (.*)$')
  if not id then return redis.error_reply('malformed acquire request ' .. request) end
  replies[#replies + 1] = acquire(id, agent, mode, tonumber(priority), ticket, tonumber(lease_ttl),
                                  tonumber(queue_ttl), amounts)
end
flush_writes()
publish_wake(wake)
return replies
