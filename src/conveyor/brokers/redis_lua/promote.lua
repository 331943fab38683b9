-- KEYS: stream, delayed, data. ARGV: limit.
if redis.call('ZCARD', KEYS[2]) == 0 then return 0 end
ensure_group(KEYS[1])
return move_due(KEYS[1], KEYS[2], KEYS[3], now_ms(), tonumber(ARGV[1]))
