-- extend.lua: push an open reservation's lease expiry forward (a heartbeat
-- for long calls).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  reservation id
-- ARGV[2]  new TTL in ms, counted from now
--
-- Reply: {1, lease_expiry_ms} (on NOW's timeline) when extended, {0, state} otherwise (state is
-- 'committed' or 'released' for 10 minutes after settlement, then 'unknown'; 'expired'; or
-- 'unknown' for an id never admitted).

local id, ttl = ARGV[1], tonumber(ARGV[2])
clock_commit()
local wake = {}
purge_leases(NOW, LEASE_NOW, wake)
flush_writes()
publish_wake(wake)
local state = redis.call('HGET', reservation_key(id), 's')
if not state then return {0, settled_state(id) or 'unknown'} end
if state ~= 'open' then return {0, state} end
local expiry = LEASE_NOW + ttl  -- on the lease clock, like every lease
redis.call('HSET', reservation_key(id), 'x', fmt(expiry))
redis.call('ZADD', K.leases, 'XX', expiry, id)
return {1, expiry + LEASE_SHIFT}
