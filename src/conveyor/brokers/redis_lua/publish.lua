-- ARGV: once() header, then per message: topic, due ms, field count, fields.
local P = ARGV[1]
local i = once()
if not i then return 0 end
local now = now_ms()
local groups_of = {}
local count = 0
while i <= #ARGV do
  local topic, due, nf = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local fields = {}
  for j = 1, nf do fields[j] = ARGV[i + 2 + j] end
  i = i + 3 + nf
  local groups = groups_of[topic]
  if not groups then
    groups = redis.call('SMEMBERS', P .. 'groups:' .. topic)
    groups_of[topic] = groups
  end
  if #groups == 0 then
    redis.call('XADD', P .. 'parked:' .. topic, '*', unpack(fields))
  end
  for _, g in ipairs(groups) do
    put(P .. 'seq', qkey(P, 'stream', topic, g), qkey(P, 'delayed', topic, g),
        qkey(P, 'data', topic, g), fields, due, now)
  end
  count = count + 1
end
return count
