-- The delayed jobs whose time has come (SubmitOptions.delay_s): their place in their VMs' order.
-- K: delayed, updates, released. A: by. Returns the released jobs as settle.lua does.
local released = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.delayed, '-inf', now)) do
  redis.call('ZREM', K.delayed, id)
  local d = redis.call('HMGET', key(P.job, id), 'state', 'held', 'namespace', 'vm', 'op', 'host', 'delay')
  if d[1] == 'queued' and d[2] == '1' then
    d[7] = ''
    release(id, d, A.by, 'its delay is over', released)
  end
end
return released
