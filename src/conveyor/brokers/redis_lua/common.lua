-- Functions every script uses: loaded in front of each one (see _lua in redis.py).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function qkey(P, kind, topic, group)
  return P .. kind .. ':' .. #topic .. ':' .. topic .. ':' .. group
end
local function ensure_group(stream)
  redis.pcall('XGROUP', 'CREATE', stream, 'conveyor', '0', 'MKSTREAM')
end
local function field(fields, name)
  for j = 1, #fields, 2 do
    if fields[j] == name then return fields[j + 1] end
  end
  return nil
end
-- Put one envelope (a flat field list) on a queue: into the stream, or into
-- the delayed set when it is not due yet.
local function put(seq, stream, delayed, data, fields, due, now)
  if due > now then
    local m = tostring(redis.call('INCR', seq))
    redis.call('ZADD', delayed, due, m)
    redis.call('HSET', data, m, cmsgpack.pack(fields))
  else
    redis.call('XADD', stream, '*', unpack(fields))
  end
end
local function move_due(stream, delayed, data, now, limit)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, limit)
  for _, m in ipairs(due) do
    local packed = redis.call('HGET', data, m)
    if packed then
      redis.call('XADD', stream, '*', unpack(cmsgpack.unpack(packed)))
    end
    redis.call('ZREM', delayed, m)
    redis.call('HDEL', data, m)
  end
  return #due
end
-- Publish and enqueue run once per call token, even when a client retries a
-- call whose reply it lost. ARGV: prefix, the client's set of applied
-- tokens, this call's token, k, k tokens whose calls the client saw succeed
-- (forgotten here, so the set stays as small as the client's concurrency),
-- then the call's own arguments. Returns where those start, or nil when
-- the call was already applied.
local function once()
  local applied, k = ARGV[2], tonumber(ARGV[4])
  for j = 1, k do redis.call('SREM', applied, ARGV[4 + j]) end
  local fresh = redis.call('SADD', applied, ARGV[3])
  redis.call('EXPIRE', applied, 86400)
  if fresh == 0 then return nil end
  return 5 + k
end
local function held_by(value, token)
  if not value then return nil end
  local d, t = string.match(value, '^(%d+):(.*)$')
  if t ~= token then return nil end
  return tonumber(d)
end
