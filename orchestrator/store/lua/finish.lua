-- Finish a job and apply its effect on the VM record, atomically and fenced; then settle.lua.
-- K: job, fence, mailbox, vm (its record), vms (the namespace's registry), host_vms (the job's
--    host's VM set), target_vms (a move's new host's VM set), events, updates, released, delayed.
-- A: token, id, state, error and result (stored as given, '' = none), vm (its name), by, detail,
--    delete (the VM is gone), update ({field = value} for the VM record, or absent), update_text
--    (the same as JSON, for the history), adjust ([{host = index into KEYS, mib, vcpus}]: the
--    reservations a move gives back).
-- Returns {1, released...} (see settle.lua), or {0} if the job was already final.
-- Refused: fenced_out; not_found (what = 'job').
-- A deleted VM gives its reservation back; a changed memory/vCPU count changes it; a moved VM
-- changes host. The VM's current host is read from its record here, under its lock: its keys are
-- derived from keys.py's patterns (key.lua).
local refused = fenced(K.fence, A.token)
if refused then return refused end
local job = redis.call('HMGET', K.job, 'state', 'op', 'parent', 'namespace')
if job[1] == false then return refuse('not_found', {what = 'job', job = A.id}) end
if is_final(job[1]) then
  redis.call('ZREM', K.mailbox, A.id)
  return {0}
end
local op = job[2]
redis.call('HSET', K.job, 'state', A.state, 'finished_at', now, 'error', A.error, 'result', A.result)
redis.call('ZREM', K.mailbox, A.id)
event(K.events, 'job', A.id, A.vm, op, A.state, A.by, A.detail)
local update = A.update
-- the reservation counts only change on a delete, a resize or a move: only they read the record
local vm = {}
if A.delete or (update and (update.memory_mib or update.vcpus or update.host)) then
  vm = redis.call('HMGET', K.vm, 'host', 'memory_mib', 'vcpus')
end
for _, a in ipairs(A.adjust) do
  redis.call('HINCRBY', KEYS[a.host], 'committed_mib', a.mib)
  redis.call('HINCRBY', KEYS[a.host], 'committed_vcpus', a.vcpus)
end
if A.delete and vm[1] then
  redis.call('HINCRBY', key(P.host, vm[1]), 'committed_mib', -tonumber(vm[2]))
  redis.call('HINCRBY', key(P.host, vm[1]), 'committed_vcpus', -tonumber(vm[3]))
end
if A.delete then
  redis.call('DEL', K.vm)
  redis.call('SREM', K.vms, A.vm)
  redis.call('SREM', K.host_vms, job[4] .. '/' .. A.vm)
  event(K.events, 'vm', A.id, A.vm, op, 'deleted', A.by, '')
elseif update and redis.call('EXISTS', K.vm) == 1 then
  if update.memory_mib then
    redis.call('HINCRBY', key(P.host, vm[1]), 'committed_mib', tonumber(update.memory_mib) - tonumber(vm[2]))
  end
  if update.vcpus then
    redis.call('HINCRBY', key(P.host, vm[1]), 'committed_vcpus', tonumber(update.vcpus) - tonumber(vm[3]))
  end
  if update.host and update.host ~= vm[1] then
    redis.call('SMOVE', key(P.host_vms, vm[1]), K.target_vms, job[4] .. '/' .. A.vm)
  end
  local fields = {'updated_at', now}
  for field, value in pairs(update) do
    table.insert(fields, field)
    table.insert(fields, value)
  end
  redis.call('HSET', K.vm, unpack(fields))
  event(K.events, 'vm', A.id, A.vm, op, update.state or redis.call('HGET', K.vm, 'state'), A.by, A.update_text)
end
redis.call('PUBLISH', K.updates, A.id .. ' ' .. A.state)
local released = settle(A.id, A.state, A.by, job[3] or '')
table.insert(released, 1, 1)
return released
