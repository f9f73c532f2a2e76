#!lua
-- Sluice limits: end a request. ARGV: used_tokens, reserved_tokens, cost_micros, month_start,
-- scope count, request id, then per scope: prefix, tokens window starts (3), budget_micros, alert percents
-- (comma-separated, may be empty). Returns the alerts fired: {scope_index, percent, spent, ...}.
local used = tonumber(ARGV[1])
local reserved = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local month_start = ARGV[4]
local scopes = tonumber(ARGV[5])
local request_id = ARGV[6]
local fired = {}
for i = 0, scopes - 1 do
  local b = 6 + i * 6
  local p = ARGV[b + 1]
  -- Applied once: a replay of a settlement that landed (its reply lost) finds no member. A
  -- request that outlived its lapse settles nothing either; its reservation stands.
  local open = redis.call('ZREM', p .. 'inflight', request_id) == 1
  if open and used ~= reserved then
    for w = 1, 3 do
      local key = p .. 't' .. w .. ':' .. ARGV[b + 1 + w]
      if redis.call('EXISTS', key) == 1 then
        local now = redis.call('INCRBY', key, used - reserved)
        if now < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
      end
    end
  end
  local budget = tonumber(ARGV[b + 5])
  if open and budget >= 0 and cost > 0 then
    local spend_key = p .. 'spend:' .. month_start
    local spent = redis.call('INCRBY', spend_key, cost)
    redis.call('EXPIRE', spend_key, 40 * 86400)
    local alerts_key = p .. 'alerts:' .. month_start
    for percent in string.gmatch(ARGV[b + 6], '%d+') do
      if spent * 100 >= budget * tonumber(percent) and redis.call('SADD', alerts_key, percent) == 1 then
        redis.call('EXPIRE', alerts_key, 40 * 86400)
        table.insert(fired, i); table.insert(fired, tonumber(percent)); table.insert(fired, spent)
      end
    end
  end
end
return fired
