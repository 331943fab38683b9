-- KEYS: stream, leases, delayed. Returns the newest entry id and the ms until
-- the next lease expiry or delayed message is due (-1: none).
local now = now_ms()
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local next_ms = -1
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local ms = math.max(0, tonumber(first[2]) - now)
    if next_ms < 0 or ms < next_ms then next_ms = ms end
  end
end
return {last[1] and last[1][1] or '', next_ms}
