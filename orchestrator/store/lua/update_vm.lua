-- Update fields of a VM record under its lock (reconciliation). Fenced; a deleted VM stays deleted.
-- K: vm, fence, events. A: token, fields ({field = value}), fields_text (the same as JSON, for the
-- history), vm (its name), by. Returns 1, or 0 if the VM no longer exists. Refused: fenced_out.
local refused = fenced(K.fence, A.token)
if refused then return refused end
if redis.call('EXISTS', K.vm) == 0 then return 0 end
for field, value in pairs(A.fields) do
  redis.call('HSET', K.vm, field, value)
end
redis.call('HSET', K.vm, 'updated_at', now)
event(K.events, 'vm', '', A.vm, '', redis.call('HGET', K.vm, 'state'), A.by, A.fields_text)
return 1
