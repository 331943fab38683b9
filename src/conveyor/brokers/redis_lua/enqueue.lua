-- ARGV: once() header, topic, group, queue member; then per message: due, nf, fields.
local P = ARGV[1]
local i = once()
if not i then return 0 end
local topic, group = ARGV[i], ARGV[i + 1]
local stream = qkey(P, 'stream', topic, group)
ensure_group(stream)
redis.call('SADD', P .. 'queues', ARGV[i + 2])
local now = now_ms()
i = i + 3
while i <= #ARGV do
  local due, nf = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local fields = {}
  for j = 1, nf do fields[j] = ARGV[i + 1 + j] end
  i = i + 2 + nf
  put(P .. 'seq', stream, qkey(P, 'delayed', topic, group), qkey(P, 'data', topic, group),
      fields, due, now)
end
return 1
