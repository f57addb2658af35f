-- A namespace's quota, changed in one step on the server: each limit given is set, each one cleared
-- goes (no limit), and the others stay as they are. So two admins changing different limits at the
-- same moment both get theirs (nothing is read on the client and written back whole), and a change
-- never recreates a namespace deleted meanwhile. submit_batch.lua reads the limits at acceptance.
-- K: namespace, vms. A: name, set ({field = limit}: the hash's quota_* fields), clear ([field...]).
-- Returns {the namespace's hash (flat, as HGETALL gives it), its VM count}: as this step left it.
-- Refused: not_found (what = 'namespace').
if redis.call('EXISTS', K.namespace) == 0 then
  return refuse('not_found', {what = 'namespace', namespace = A.name})
end
for field, limit in pairs(A.set) do
  redis.call('HSET', K.namespace, field, limit)
end
for _, field in ipairs(A.clear) do
  redis.call('HDEL', K.namespace, field)
end
return {redis.call('HGETALL', K.namespace), redis.call('SCARD', K.vms)}
