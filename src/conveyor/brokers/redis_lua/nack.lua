-- KEYS: stream, leases, held, delayed, data, seq. ARGV: id, token, delay ms.
local stream, leases, held, delayed, data = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, token = ARGV[1], ARGV[2]
local d = held_by(redis.call('HGET', held, id), token)
if not d then return 0 end
local entry = redis.call('XRANGE', stream, id, id)
if entry[1] then
  local fields = entry[1][2]
  local found = false
  for j = 1, #fields, 2 do
    if fields[j] == 'attempt' then
      fields[j + 1] = tostring(tonumber(fields[j + 1]) + d)
      found = true
    end
  end
  if not found then
    fields[#fields + 1] = 'attempt'
    fields[#fields + 1] = tostring(d)
  end
  local m = tostring(redis.call('INCR', KEYS[6]))
  redis.call('ZADD', delayed, now_ms() + tonumber(ARGV[3]), m)
  redis.call('HSET', data, m, cmsgpack.pack(fields))
end
redis.call('XACK', stream, 'conveyor', id)
redis.call('XDEL', stream, id)
redis.call('HDEL', held, id)
redis.call('ZREM', leases, id)
return 1
