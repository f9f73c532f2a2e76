#!lua
-- Sluice limits: check every limit of every scope, then charge them all, atomically.
-- ARGV: tokens, month_start, month_end, scope count, request id, then per scope 12 values:
--   prefix, rps, burst, rpm, rph, rpd, tpm, tpd, tpmonth, concurrent, budget_micros, stop_micros
-- (-1 = no such limit). Times come from the Redis server, so replicas agree.
-- Returns {0, scope_index, limit_code, retry_ms} or
--         {1, req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining, tok_reset_ms, now_secs,
--          then per scope the month's spend before this request (-1 without a budget)}: a
--          downgrade rule needs no second round trip.
local time = redis.call('TIME')
local secs = tonumber(time[1])
local now_ms = secs * 1000 + math.floor(tonumber(time[2]) / 1000)
local tokens = tonumber(ARGV[1])
local month_start = tonumber(ARGV[2])
local month_end = tonumber(ARGV[3])
local scopes = tonumber(ARGV[4])
local request_id = ARGV[5]
-- In-flight requests are members of a sorted set scored by when they lapse: a replica that dies
-- mid-request cannot give its places back, and its members lapse one by one. Every admitted
-- request is a member, limited concurrency or not: settle.lua applies a settlement only when it
-- removes the member, so a settlement replayed after a lost reply is applied once.
local IN_FLIGHT_LAPSE_MS = 3600 * 1000
local request_spans = {60, 3600, 86400}
local token_spans = {60, 86400}

local req = {-1, -1, -1}
local tok = {-1, -1, -1}
local function tighter(best, limit, remaining, reset)
  if best[1] < 0 or remaining < best[2] then
    best[1] = limit; best[2] = remaining; best[3] = reset
  end
end
local function token_window(w)
  if w == 3 then return month_start, month_end end
  local start = secs - secs % token_spans[w]
  return start, start + token_spans[w]
end

local tats = {}
local spends = {}
for i = 0, scopes - 1 do
  local b = 5 + i * 12
  local p = ARGV[b + 1]
  local rps = tonumber(ARGV[b + 2])
  if rps > 0 then
    local interval = 1000 / rps
    local tolerance = interval * tonumber(ARGV[b + 3])
    local tat = tonumber(redis.call('GET', p .. 'tat') or now_ms)
    if tat < now_ms then tat = now_ms end
    local ahead = tat + interval - now_ms
    if ahead > tolerance then return {0, i, 1, math.ceil(ahead - tolerance)} end
    tats[i] = tat + interval
    tighter(req, tonumber(ARGV[b + 3]), math.floor((tolerance - ahead) / interval), math.ceil(ahead))
  end
  for w = 1, 3 do
    local limit = tonumber(ARGV[b + 3 + w])
    if limit >= 0 then
      local start = secs - secs % request_spans[w]
      local count = tonumber(redis.call('GET', p .. 'r' .. w .. ':' .. start) or '0')
      local reset = (start + request_spans[w] - secs) * 1000
      if count + 1 > limit then return {0, i, 1 + w, reset} end
      tighter(req, limit, limit - count - 1, reset)
    end
  end
  for w = 1, 3 do
    local limit = tonumber(ARGV[b + 6 + w])
    if limit >= 0 then
      local start, finish = token_window(w)
      local count = tonumber(redis.call('GET', p .. 't' .. w .. ':' .. start) or '0')
      local reset = (finish - secs) * 1000
      if count + tokens > limit then return {0, i, 4 + w, reset} end
      tighter(tok, limit, limit - count - tokens, reset)
    end
  end
  local concurrent = tonumber(ARGV[b + 10])
  redis.call('ZREMRANGEBYSCORE', p .. 'inflight', '-inf', now_ms)
  if concurrent >= 0 then
    if redis.call('ZCARD', p .. 'inflight') + 1 > concurrent then
      return {0, i, 8, 1000}
    end
  end
  spends[i + 1] = -1
  if tonumber(ARGV[b + 11]) >= 0 then
    local spent = tonumber(redis.call('GET', p .. 'spend:' .. month_start) or '0')
    local stop = tonumber(ARGV[b + 12])
    if stop >= 0 and spent >= stop then
      return {0, i, 9, (month_end - secs) * 1000}
    end
    spends[i + 1] = spent
  end
end

for i = 0, scopes - 1 do
  local b = 5 + i * 12
  local p = ARGV[b + 1]
  if tats[i] then
    redis.call('SET', p .. 'tat', tats[i], 'PX', math.ceil(tats[i] - now_ms) + 1000)
  end
  for w = 1, 3 do
    if tonumber(ARGV[b + 3 + w]) >= 0 then
      local key = p .. 'r' .. w .. ':' .. (secs - secs % request_spans[w])
      redis.call('INCR', key)
      redis.call('EXPIRE', key, request_spans[w] + 60)
    end
  end
  for w = 1, 3 do
    if tonumber(ARGV[b + 6 + w]) >= 0 then
      local start, finish = token_window(w)
      local key = p .. 't' .. w .. ':' .. start
      redis.call('INCRBY', key, tokens)
      redis.call('EXPIREAT', key, finish + 3600)
    end
  end
  local inflight = p .. 'inflight'
  redis.call('ZADD', inflight, now_ms + IN_FLIGHT_LAPSE_MS, request_id)
  redis.call('PEXPIRE', inflight, IN_FLIGHT_LAPSE_MS)
end
local reply = {1, req[1], req[2], req[3], tok[1], tok[2], tok[3], secs}
for i = 1, scopes do table.insert(reply, spends[i]) end
return reply
