-- quote.lua: would an acquire be admitted now, and if not, which limit
-- denies it and when would it fit? Read-only: it charges, queues, stores and
-- publishes nothing (READ_ONLY, lib.lua). It judges as acquire.lua would at
-- the same instant, for a newcomer in 'wait' mode: expired leases count as
-- returned, waiters already queued (of its priority or higher) go first.
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  "<agent> <model> <run> <priority> <amounts>" joined by single
--          spaces: agent, model and run '' for none (a run's caps are judged
--          as acquire judges them); amounts "dim=int dim=int ..." (usd in
--          nano-dollars)
--
-- Reply, one of:
--   {1, now_ms}                                          it fits now
--   {0, now_ms, retry_at_ms, limit_key, reason, amount}   it does not: retry_at_ms
--                                                         (NOW's timeline) is when the
--                                                         limits that are full will have
--                                                         room, -1 when only a settlement,
--                                                         a reset or the waiters ahead can
--                                                         make room; reason 'capacity' or
--                                                         'queue'
--   {-1, limit_key, limit_amount, requested}              larger than the limit itself
--   {-2, agent}                                           no limits stored (LimitsMissing)
--   {-3, reason, limit_key, limit_amount, used, requested} the run cannot take it (as acquire.lua)
--
-- Clock: computes NOW as the next writing script would and stores nothing.

READ_ONLY = true
local agent, model, run, priority, amounts = string.match(ARGV[1], '^(%S*) (%S*) (%S*) (%S+) ?(.*)$')
if not agent then return redis.error_reply('malformed quote request ' .. ARGV[1]) end

purge_leases(NOW, LEASE_NOW, {})
local limits = applicable_limits(agent, model, run ~= '' and run or nil)
if not limits.stored then return {-2, agent} end
amounts = parse_amounts(amounts)
if limits.run then
  local _, spent = run_verdict(limits.run, amounts, 'wait', {})
  if spent then return spent end
end
local needed, too_large = needs(limits, amounts, 'wait')
if too_large then return too_large end
local rank = (MAX_PRIORITY - tonumber(priority)) * RANK_SPAN + RANK_SPAN - 1  -- after every waiter of its priority
local v = check(needed, 'wait', '', rank, anyone_waiting())
if #v.blocked == 0 then return {1, NOW} end
return {0, NOW, v.retry_at, v.first, v.reason, v.first_amount}
