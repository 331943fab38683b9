-- KEYS: stream, leases, held. ARGV: id, token pairs.
local done = 0
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  if held_by(redis.call('HGET', KEYS[3], id), ARGV[i + 1]) then
    redis.call('XACK', KEYS[1], 'conveyor', id)
    redis.call('XDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZREM', KEYS[2], id)
    done = done + 1
  end
end
return done
