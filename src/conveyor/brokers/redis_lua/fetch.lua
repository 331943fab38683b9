-- KEYS: stream, leases, held, delayed, data, seq. ARGV: limit, lease ms, token.
local stream, leases, held, delayed, data = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = now_ms()
if redis.call('EXISTS', stream) == 0 then
  if redis.call('ZCARD', delayed) == 0 then return {{}, ''} end
  ensure_group(stream)
end
move_due(stream, delayed, data, now, 1000)
local n, deadline, token = tonumber(ARGV[1]), now + tonumber(ARGV[2]), ARGV[3]
local out = {}
local function deliver(id, fields)
  local d = 1
  local v = redis.call('HGET', held, id)
  if v then d = tonumber(string.match(v, '^(%d+):')) + 1 end
  redis.call('HSET', held, id, d .. ':' .. token)
  redis.call('ZADD', leases, deadline, id)
  out[#out + 1] = {id, d, fields}
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, n)) do
  local claimed = redis.call('XCLAIM', stream, 'conveyor', 'conveyor', 0, id)
  if claimed[1] then
    deliver(claimed[1][1], claimed[1][2])
  else
    redis.call('ZREM', leases, id)
    redis.call('HDEL', held, id)
  end
end
for _ = 1, 10 do
  if #out >= n then break end
  local r = redis.call('XREADGROUP', 'GROUP', 'conveyor', 'conveyor', 'COUNT', n - #out,
                       'STREAMS', stream, '>')
  if not r or #r[1][2] == 0 then break end
  for _, e in ipairs(r[1][2]) do
    local nb = field(e[2], 'not_before')
    local due = nb and math.floor(tonumber(nb) * 1000) or 0
    if due > now then
      -- Parked before its group existed, it reached the stream early.
      redis.call('XACK', stream, 'conveyor', e[1])
      redis.call('XDEL', stream, e[1])
      put(KEYS[6], stream, delayed, data, e[2], due, now)
    else
      deliver(e[1], e[2])
    end
  end
end
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
return {out, last[1] and last[1][1] or ''}
