-- Finish a job and apply its effect on the VM record, atomically and fenced; then settle.lua.
-- K: job, fence, mailbox, vm (its record), vms (the namespace's registry), host_vms (the job's
--    host's VM set), target_vms (a move's new host's VM set), events, updates, released, delayed.
-- A: token, id, state, error and result (stored as given, '' = none), vm (its name), by, detail,
--    delete (the VM is gone), update ({field = value} for the VM record, or absent), update_text
--    (the same as JSON, for the history), adjust ([{host = index into KEYS, mib, vcpus}]: more
--    reservations to change).
-- Returns {1, released...} (see settle.lua), or {0} if the job was already final.
-- Refused: fenced_out; not_found (what = 'job').
-- The host's reservation follows what the VM holds (reserve.lua: the larger of set and live): a
-- deleted VM gives it back, a change of what is set or live (or a VM turned off) changes it, and a
-- moved VM's source gives it back while its target keeps it, in place of what the move-out's
-- acceptance reserved there (submit_batch.lua; a move-out that did not move it gives that back,
-- settle.lua). The VM's current host is read from its record here, under its lock: its keys are
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
local at = (A.delete or update) and redis.call('HGET', K.vm, 'host')
for _, a in ipairs(A.adjust) do
  charge(KEYS[a.host], a.mib, a.vcpus)
end
if A.delete and at then
  local mib, vcpus = held_by(K.vm)
  charge(key(P.host, at), -mib, -vcpus)
end
if A.delete then
  redis.call('DEL', K.vm)
  redis.call('SREM', K.vms, A.vm)
  redis.call('SREM', K.host_vms, job[4] .. '/' .. A.vm)
  event(K.events, 'vm', A.id, A.vm, op, 'deleted', A.by, '')
elseif update and redis.call('EXISTS', K.vm) == 1 then
  local mib0, vcpus0, mib1, vcpus1 = reheld(K.vm, update)
  if at and update.host and update.host ~= at then
    local r = redis.call('HMGET', K.job, 'reserved_on', 'reserved_mib', 'reserved_vcpus')
    if r[1] ~= update.host then r = {update.host, 0, 0} end
    charge(key(P.host, at), -mib0, -vcpus0)
    charge(key(P.host, update.host), mib1 - tonumber(r[2]), vcpus1 - tonumber(r[3]))
    redis.call('SMOVE', key(P.host_vms, at), K.target_vms, job[4] .. '/' .. A.vm)
  elseif at then
    charge(key(P.host, at), mib1 - mib0, vcpus1 - vcpus0)
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
