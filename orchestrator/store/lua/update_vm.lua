-- Update fields of a VM record under its lock (reconciliation). Fenced; a deleted VM stays deleted.
-- K: vm, fence, events. A: token, fields ({field = value}), fields_text (the same as JSON, for the
-- history), vm (its name), by. Returns 1, or 0 if the VM no longer exists. Refused: fenced_out.
-- A corrected memory or vCPU count (or a VM found off, whose live values go) moves the host's
-- reservation with it, as a job's finish does: what placement counts is what the VM holds
-- (reserve.lua; its host derived from the record: P.host).
local refused = fenced(K.fence, A.token)
if refused then return refused end
if redis.call('EXISTS', K.vm) == 0 then return 0 end
local host = redis.call('HGET', K.vm, 'host')
local mib0, vcpus0, mib1, vcpus1 = reheld(K.vm, A.fields)
if host and host ~= '' then
  charge(key(P.host, host), mib1 - mib0, vcpus1 - vcpus0)
end
for field, value in pairs(A.fields) do
  redis.call('HSET', K.vm, field, value)
end
redis.call('HSET', K.vm, 'updated_at', now)
event(K.events, 'vm', '', A.vm, '', redis.call('HGET', K.vm, 'state'), A.by, A.fields_text)
return 1
