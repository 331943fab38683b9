-- ARGV: prefix, topic, group, queue member.
local P, topic, group = ARGV[1], ARGV[2], ARGV[3]
local groups = P .. 'groups:' .. topic
local stream = qkey(P, 'stream', topic, group)
if redis.call('SADD', groups, group) == 1 then
  redis.call('SADD', P .. 'queues', ARGV[4])
  local parked = P .. 'parked:' .. topic
  if redis.call('SCARD', groups) == 1 and redis.call('EXISTS', parked) == 1 then
    if redis.call('EXISTS', stream) == 0 then
      redis.call('RENAME', parked, stream)
    else
      for _, e in ipairs(redis.call('XRANGE', parked, '-', '+')) do
        redis.call('XADD', stream, '*', unpack(e[2]))
      end
      redis.call('DEL', parked)
    end
  end
end
ensure_group(stream)
return 1
