-- ARGV: prefix. One row per queue: member, ready, in flight, delayed.
local P = ARGV[1]
local now = now_ms()
local rows = {}
for _, member in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local q = cjson.decode(member)
  local topic, group = q[1], q[2]
  local length = redis.call('XLEN', qkey(P, 'stream', topic, group))
  local leased = redis.call('ZCOUNT', qkey(P, 'leases', topic, group), '(' .. now, '+inf')
  local delayed = qkey(P, 'delayed', topic, group)
  local due = redis.call('ZCOUNT', delayed, '-inf', now)
  local later = redis.call('ZCARD', delayed) - due
  rows[#rows + 1] = {member, length - leased + due, leased, later}
end
return rows
