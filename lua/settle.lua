-- settle.lua: commit a reservation's actual cost, or release it (refund).
-- Idempotent: a reservation is settled once; later calls change nothing.
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"; KEYS[2..] more tenants
--          served by the same call (lib.lua "tenants")
-- ARGV     one or more settlements of 4 arguments each (a batch, run in
--          order, each on its own; with several keys ARGV[1] says how many
--          arguments are each tenant's, 4 per settlement):
-- ARGV[1]  "<reservation id> <kind> <maxlen> <actual>" joined by single
--          spaces: kind is 'commit' or 'release'; maxlen the ledger stream's
--          max length (approximate trim), 0 to write no entry; actual the
--          rest of the string, amounts "dim=int ..." (commit; a reserved
--          dimension left out keeps its estimate; concurrency is always
--          returned)
-- ARGV[2]  model name for the ledger ('' for the model the reservation was
--          acquired for, if any)
-- ARGV[3]  outcome for the ledger ('' -> 'ok', or 'overrun' when an actual
--          exceeded its estimate; a release writes an entry only when given)
-- ARGV[4]  caller metadata, a JSON object as a string ('' for none)
--
-- Reply: a list with one reply per settlement, in order (tenant after tenant), each one of:
--   {1, state, overrun, ledger_id}  settled now; state 'committed' or
--                                   'released'; overrun "dim=int ..." charged
--                                   beyond the estimate; ledger_id or ''
--   {0, state}                      nothing changed: state is 'committed' or
--                                   'released' (settled before: its tombstone,
--                                   kept 10 minutes, lib.lua "reservation
--                                   records"), 'expired' (a release after the
--                                   lease ran out refunds nothing) or 'unknown'
--                                   (never admitted, or settled longer ago)
--
-- Settling replaces the reservation's record B:r:<id> by its tombstone
-- B:s:<id> (lib.lua, settle_record).
--
-- A lease that already expired may still be committed: the actual cost
-- replaces the estimate that stayed charged.
--
-- A reservation made in a run (field u) settles on the run's caps like on
-- every other window it was charged to; a commit also counts its final
-- amounts on the run (per dimension and per model) and refreshes the run's
-- TTL. A run whose keys expired is left alone.

-- The open tenant's state for the script (open_settle, for each tenant of the call).
local wake, limits_of, waiting

local function open_settle()
  clock_commit()
  wake = {}
  purge_leases(NOW, LEASE_NOW, wake)
  limits_of = limits_memo()
  waiting = anyone_waiting()  -- settling queues nobody: true or false for the whole batch
end

-- What each dimension finally costs: the actual where given, else the
-- estimate; a release costs nothing; concurrency is always returned.
local function final_amounts(kind, estimate, actual)
  local final = {}
  for dim, est in pairs(estimate) do
    if kind == 'release' or dim == 'concurrency' then final[dim] = 0
    elseif actual[dim] ~= nil then final[dim] = actual[dim]
    else final[dim] = est end
  end
  if kind == 'commit' then
    for dim, v in pairs(actual) do if final[dim] == nil then final[dim] = v end end
  end
  return final
end

-- Replace each charge of the reservation by its final amount, in the bucket
-- it was charged to. Returns the limits that got capacity back, and the set
-- of limits the reservation was charged on.
local function settle_charges(charges_text, final, expired, agent, current_limits)
  local refunded, charged = {}, {}
  for _, c in ipairs(parse_charges(charges_text)) do
    local dim = c.L.d
    charged[c.L.lk] = true
    local dt = final[dim] - c.amt
    if expired and dim == 'concurrency' then dt = 0 end  -- returned when the lease expired
    local window = dt ~= 0 and adjust(c.L, c.gen, c.idx, dt, NOW)
    if window then
      if dt < 0 then refunded[#refunded + 1] = c.L.lk end
      if dt > 0 then
        add_overrun(c.L, dt)
        local L = current_limits()[c.L.lk]
        if L then thresholds(L, window.t - dt, window.t, agent) end
      end
    end
  end
  return refunded, charged
end

-- Usage in a dimension that was not reserved at all is charged now, to the
-- current bucket: an estimate that was too low is still charged. Returns the
-- dimensions so charged.
local function charge_unreserved(final, estimate, charged, agent, current_limits)
  local charged_now, unreserved = {}, false
  for dim, v in pairs(final) do
    if v > 0 and (estimate[dim] or 0) == 0 then unreserved = true end
  end
  if not unreserved then return charged_now end
  for lk, L in pairs(current_limits()) do
    local amount = final[L.d] or 0
    if not charged[lk] and amount > 0 and L.d ~= 'concurrency' then
      charged_now[L.d] = true
      local _, _, t = charge(L, advance(L, NOW), amount, NOW, agent)
      add_overrun(L, amount)
      thresholds(L, t - amount, t, agent)
    end
  end
  return charged_now
end

-- An overrun is usage beyond what was reserved, in a dimension that was
-- reserved or that a limit had to charge; usage nothing limits is not one.
local function overruns(final, estimate, charged_now)
  local out = {}
  for dim, v in pairs(final) do
    local est = estimate[dim] or 0
    local counted = est > 0 or charged_now[dim]
    if dim ~= 'concurrency' and counted and v > est then out[#out + 1] = dim .. '=' .. fmt(v - est) end
  end
  return out
end

local BUILTIN = {usd = true, tokens = true, input_tokens = true, output_tokens = true, requests = true,
                 concurrency = true}

-- A ledger entry: the built-in amounts as fields of their own, custom
-- dimensions (tool_calls, steps...) in one field 'x' ("dim=int ...", sorted).
local function write_ledger(id, agent, final, estimate, maxlen, model, outcome, meta, expired)
  local function amount(dim) return fmt(final[dim] or 0) end
  local custom = {}
  for dim, v in pairs(final) do
    if not BUILTIN[dim] and v ~= 0 then custom[#custom + 1] = dim .. '=' .. fmt(v) end
  end
  table.sort(custom)
  return redis.call('XADD', K.ledger, 'MAXLEN', '~', maxlen, '*',
    'ts', fmt(NOW), 'agent', agent, 'model', model,
    'usd', amount('usd'), 'input_tokens', amount('input_tokens'),
    'output_tokens', amount('output_tokens'), 'tokens', amount('tokens'),
    'requests', amount('requests'), 'est_usd', fmt(estimate['usd'] or 0),
    'reservation', id, 'outcome', outcome, 'late', expired and '1' or '0', 'meta', meta,
    'x', table.concat(custom, ' '))
end

local function settle(id, kind, actual, maxlen, model, outcome, meta)
  local rkey = reservation_key(id)
  local rs = redis.call('HMGET', rkey, 's', 'a', 'c', 'e', 'm', 'u')
  local state, agent, acquired_model, run_id = rs[1], rs[2] or '', rs[5] or '', rs[6] or ''
  if not state then return {0, settled_state(id) or 'unknown'} end
  if state ~= 'open' and state ~= 'expired' then return {0, state} end
  if state == 'expired' and kind == 'release' then return {0, 'expired'} end
  local expired = state == 'expired'
  if model == '' then model = acquired_model end

  local config = nil
  local function current_limits()
    if config == nil then
      config = {}
      for _, L in ipairs(limits_of(agent, acquired_model, run_id)) do config[L.lk] = L end
    end
    return config
  end
  local estimate = parse_amounts(rs[4])
  local final = final_amounts(kind, estimate, actual)
  local refunded, charged = settle_charges(rs[3], final, expired, agent, current_limits)
  local over = {}
  if kind == 'commit' then
    over = overruns(final, estimate, charge_unreserved(final, estimate, charged, agent, current_limits))
  end
  local run = run_id ~= '' and limits_of(agent, acquired_model, run_id).run
  if run then
    if kind == 'commit' then run_committed(run, final, model) end
    touch_run(run)
  end

  state = kind == 'commit' and 'committed' or 'released'
  settle_record(id, state)
  drop_lease(id)

  local ledger_id = ''
  if maxlen > 0 and (kind == 'commit' or outcome ~= '') then
    if outcome == '' then outcome = (#over > 0) and 'overrun' or 'ok' end
    ledger_id = write_ledger(id, agent, final, estimate, maxlen, model, outcome, meta, expired)
  end
  if #over > 0 then
    publish_event('overrun', {agent = agent, reservation = id, overrun = table.concat(over, ' ')})
  end
  if waiting then heads_of(refunded, wake) end
  return {1, state, table.concat(over, ' '), ledger_id}
end

return serve_tenants(function(first, last)
  if (last - first + 1) % 4 ~= 0 then return redis.error_reply('a settlement takes 4 arguments') end
  open_settle()
  local replies = {}
  for i = first, last, 4 do
    local id, kind, maxlen, actual = string.match(ARGV[i], '^(%S+) (%S+) (%S+) ?(.*)$')
    if not id then return redis.error_reply('malformed settle request ' .. ARGV[i]) end
    replies[#replies + 1] = settle(id, kind, parse_amounts(actual), tonumber(maxlen), ARGV[i + 1], ARGV[i + 2],
                                   ARGV[i + 3])
  end
  flush_writes()
  publish_wake(wake)
  return replies
end)
