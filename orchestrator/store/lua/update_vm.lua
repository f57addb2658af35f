-- Update fields of a VM record under its lock (reconciliation). Fenced; a deleted VM stays deleted.
-- K: vm, fence, events. A: token, fields ({field = value}), fields_text (the same as JSON, for the
-- history), vm (its name), by. Returns 1, or 0 if the VM no longer exists. Refused: fenced_out.
-- A corrected memory or vCPU count moves the host's reservation with it, as a resize job's finish
-- does: what placement counts is what the VM holds (its host derived from the record: P.host).
local refused = fenced(K.fence, A.token)
if refused then return refused end
if redis.call('EXISTS', K.vm) == 0 then return 0 end
local was = redis.call('HMGET', K.vm, 'host', 'memory_mib', 'vcpus')
if was[1] and was[1] ~= '' then
  if A.fields.memory_mib then
    redis.call('HINCRBY', key(P.host, was[1]), 'committed_mib', tonumber(A.fields.memory_mib) - tonumber(was[2] or 0))
  end
  if A.fields.vcpus then
    redis.call('HINCRBY', key(P.host, was[1]), 'committed_vcpus', tonumber(A.fields.vcpus) - tonumber(was[3] or 0))
  end
end
for field, value in pairs(A.fields) do
  redis.call('HSET', K.vm, field, value)
end
redis.call('HSET', K.vm, 'updated_at', now)
event(K.events, 'vm', '', A.vm, '', redis.call('HGET', K.vm, 'state'), A.by, A.fields_text)
return 1
