"""Lua scripts for every multi-key change to the job store.

Each runs atomically in Redis, so a job's id, its per-VM sequence number and its place
in the VM's mailbox are assigned together; and every write a worker makes under a lock
first checks the lock's fencing token (guarantee 3): a holder whose lock expired and was
taken over finds a newer token and is refused.
"""

from __future__ import annotations

# Timestamps come from Redis's clock, so every host agrees on one clock.
_NOW = """
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
"""

# History: every script that changes a job or a VM appends what changed to the namespace's
# event stream (its last KEY), in the same atomic step, so history can't disagree with state.
_EVENT = """
local function event(kind, job, vm, op, state, by, detail)
  redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', 100000, '*', 'at', now, 'kind', kind, 'job', job,
    'vm', vm, 'op', op, 'state', state, 'by', by, 'detail', detail)
end
"""

_FENCE = """
local function fenced(fence_key, token)
  if redis.call('GET', fence_key) ~= token then
    return redis.error_reply('fenced_out')
  end
  return nil
end
"""

# KEYS: job_next, vms(ns), vm_seq, mailbox, jobs(ns), vm record, updates channel, events(ns)
# ARGV: job_prefix, ns, vm, op, params_json, who
SUBMIT = _NOW + _EVENT + """
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0 then
  return redis.error_reply('not_found')
end
local host = redis.call('HGET', KEYS[6], 'host')
local id = redis.call('INCR', KEYS[1])
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', ARGV[1] .. id, 'id', id, 'op', ARGV[4], 'namespace', ARGV[2], 'vm', ARGV[3],
  'host', host, 'state', 'queued', 'seq', seq, 'submitted_at', now, 'attempts', 0, 'params', ARGV[5])
redis.call('ZADD', KEYS[4], seq, id)
redis.call('ZADD', KEYS[5], id, id)
redis.call('PUBLISH', KEYS[7], id .. ' queued')
event('job', id, ARGV[3], ARGV[4], 'queued', ARGV[6], 'seq ' .. seq .. ' on host ' .. host)
return {id, seq, host}
"""

# The VM record, its registry entry and its launch job, in one step.
# LOCK: the caller holds cmd:<ns> and vms:<ns> (name reservation and placement).
# KEYS: job_next, vms(ns), vm_seq, mailbox, jobs(ns), vm record, updates, namespaces, host_vms, host record,
#       namespace record, events(ns)
# ARGV: job_prefix, ns, vm, params_json, host, memory_mib, vcpus, disk_gib, image, tags_json, domain, who
SUBMIT_LAUNCH = _NOW + _EVENT + """
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 1 then
  return redis.error_reply('already_exists')
end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[8], ARGV[2])
redis.call('HSETNX', KEYS[11], 'created_at', now)  -- a first launch creates its namespace
redis.call('SADD', KEYS[9], ARGV[2] .. '/' .. ARGV[3])
-- the reservation: placement decided under this host's lock, and it counts from now on
redis.call('HINCRBY', KEYS[10], 'committed_mib', ARGV[6])
redis.call('HINCRBY', KEYS[10], 'committed_vcpus', ARGV[7])
redis.call('HSET', KEYS[6], 'name', ARGV[3], 'namespace', ARGV[2], 'host', ARGV[5], 'state', 'missing',
  'memory_mib', ARGV[6], 'vcpus', ARGV[7], 'disk_gib', ARGV[8], 'image', ARGV[9], 'tags', ARGV[10],
  'snapshots', '[]', 'domain', ARGV[11], 'created_at', now, 'updated_at', now, 'note', 'launch queued')
local id = redis.call('INCR', KEYS[1])
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', ARGV[1] .. id, 'id', id, 'op', 'launch', 'namespace', ARGV[2], 'vm', ARGV[3],
  'host', ARGV[5], 'state', 'queued', 'seq', seq, 'submitted_at', now, 'attempts', 0, 'params', ARGV[4])
redis.call('ZADD', KEYS[4], seq, id)
redis.call('ZADD', KEYS[5], id, id)
redis.call('PUBLISH', KEYS[7], id .. ' queued')
event('vm', '', ARGV[3], 'launch', 'missing', ARGV[12], 'registered on host ' .. ARGV[5])
event('job', id, ARGV[3], 'launch', 'queued', ARGV[12], 'seq ' .. seq .. ' on host ' .. ARGV[5])
return {id, seq, ARGV[5]}
"""

# A worker picked the message up; the job now waits for its turn. Only from queued.
# KEYS: job, updates, events(ns); ARGV: id, worker
MARK_WAITING = _NOW + _EVENT + """
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'waiting')
  redis.call('PUBLISH', KEYS[2], ARGV[1] .. ' waiting')
  local job = redis.call('HMGET', KEYS[1], 'vm', 'op')
  event('job', ARGV[1], job[1], job[2], 'waiting', ARGV[2], 'waiting for its turn')
  return 1
end
return 0
"""

# A move: its two jobs in one step, so nothing slips between them in the VM's order, and the
# target's reservation. LOCK: the caller holds cmd:<ns> and both hosts' locks.
# KEYS: job_next, vms(ns), vm_seq, mailbox, jobs(ns), vm record, updates, target host record, events(ns)
# ARGV: job_prefix, ns, vm, out_params, in_params, source, target, who
SUBMIT_MOVE = _NOW + _EVENT + """
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0 then
  return redis.error_reply('not_found')
end
local vm = redis.call('HMGET', KEYS[6], 'host', 'memory_mib', 'vcpus')
if vm[1] ~= ARGV[6] then
  return redis.error_reply('moved')
end
redis.call('HINCRBY', KEYS[8], 'committed_mib', vm[2])
redis.call('HINCRBY', KEYS[8], 'committed_vcpus', vm[3])
local out = {}
local jobs = {{'move-out', ARGV[4], ARGV[6]}, {'move-in', ARGV[5], ARGV[7]}}
for i, j in ipairs(jobs) do
  local id = redis.call('INCR', KEYS[1])
  local seq = redis.call('INCR', KEYS[3])
  redis.call('HSET', ARGV[1] .. id, 'id', id, 'op', j[1], 'namespace', ARGV[2], 'vm', ARGV[3],
    'host', j[3], 'state', 'queued', 'seq', seq, 'submitted_at', now, 'attempts', 0, 'params', j[2])
  redis.call('ZADD', KEYS[4], seq, id)
  redis.call('ZADD', KEYS[5], id, id)
  redis.call('PUBLISH', KEYS[7], id .. ' queued')
  event('job', id, ARGV[3], j[1], 'queued', ARGV[8], 'seq ' .. seq .. ' on host ' .. j[3])
  table.insert(out, id)
  table.insert(out, seq)
end
return out
"""

# Start (or restart, after a crash) an attempt. Refused if the job is final or fenced out.
# KEYS: job, fence, updates, events(ns); ARGV: token, id, worker
BEGIN = _NOW + _EVENT + _FENCE + """
local refused = fenced(KEYS[2], ARGV[1])
if refused then return refused end
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then return redis.error_reply('not_found') end
if state == 'succeeded' or state == 'failed' or state == 'canceled' then return {0, state} end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', now, 'worker', ARGV[3])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('PUBLISH', KEYS[3], ARGV[2] .. ' running')
local job = redis.call('HMGET', KEYS[1], 'vm', 'op')
event('job', ARGV[2], job[1], job[2], 'running', ARGV[3], 'attempt ' .. attempts .. ', fence ' .. ARGV[1])
return {1, attempts}
"""

# Finish a job and apply its effect on the VM record, atomically and fenced.
# KEYS: job, fence, mailbox, vm record, vms(ns), host_vms, updates, events(ns)
# ARGV: token, id, state, error_json, result_json, vm_update_json ('' = none), delete_vm ('1'/'0'), member,
#       worker, detail, host_prefix, adjust_json ('' or [[host, mib, vcpus], ...])
# A deleted VM gives its reservation back; a changed memory/vCPU count changes it; a moved VM
# changes host (adjust carries the reservations a move gives back).
FINISH = _NOW + _EVENT + _FENCE + """
local refused = fenced(KEYS[2], ARGV[1])
if refused then return refused end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'succeeded' or state == 'failed' or state == 'canceled' then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', now, 'error', ARGV[4], 'result', ARGV[5])
redis.call('ZREM', KEYS[3], ARGV[2])
local op = redis.call('HGET', KEYS[1], 'op')
event('job', ARGV[2], ARGV[8], op, ARGV[3], ARGV[9], ARGV[10])
local vm = redis.call('HMGET', KEYS[4], 'host', 'memory_mib', 'vcpus')
if ARGV[12] ~= '' then
  for _, a in ipairs(cjson.decode(ARGV[12])) do
    redis.call('HINCRBY', ARGV[11] .. a[1], 'committed_mib', a[2])
    redis.call('HINCRBY', ARGV[11] .. a[1], 'committed_vcpus', a[3])
  end
end
if ARGV[7] == '1' and vm[1] then
  redis.call('HINCRBY', ARGV[11] .. vm[1], 'committed_mib', -tonumber(vm[2]))
  redis.call('HINCRBY', ARGV[11] .. vm[1], 'committed_vcpus', -tonumber(vm[3]))
end
if ARGV[7] == '1' then
  redis.call('DEL', KEYS[4])
  redis.call('SREM', KEYS[5], ARGV[8])
  redis.call('SREM', KEYS[6], redis.call('HGET', KEYS[1], 'namespace') .. '/' .. ARGV[8])
  event('vm', ARGV[2], ARGV[8], op, 'deleted', ARGV[9], '')
elseif ARGV[6] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then
  local update = cjson.decode(ARGV[6])
  if update['memory_mib'] then
    redis.call('HINCRBY', ARGV[11] .. vm[1], 'committed_mib', tonumber(update['memory_mib']) - tonumber(vm[2]))
  end
  if update['vcpus'] then
    redis.call('HINCRBY', ARGV[11] .. vm[1], 'committed_vcpus', tonumber(update['vcpus']) - tonumber(vm[3]))
  end
  if update['host'] and update['host'] ~= vm[1] then
    local member = redis.call('HGET', KEYS[1], 'namespace') .. '/' .. ARGV[8]
    redis.call('SMOVE', ARGV[11] .. vm[1] .. ':vms', ARGV[11] .. update['host'] .. ':vms', member)
  end
  for field, value in pairs(update) do
    redis.call('HSET', KEYS[4], field, value)
  end
  redis.call('HSET', KEYS[4], 'updated_at', now)
  event('vm', ARGV[2], ARGV[8], op, redis.call('HGET', KEYS[4], 'state'), ARGV[9], ARGV[6])
end
redis.call('PUBLISH', KEYS[7], ARGV[2] .. ' ' .. ARGV[3])
return 1
"""

# Cancel: a job not yet running is canceled at once; a running one is asked to stop.
# KEYS: job, mailbox, updates, events(ns); ARGV: id, error_json, who
CANCEL = _NOW + _EVENT + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then return redis.error_reply('not_found') end
if state == 'queued' or state == 'waiting' then
  redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished_at', now, 'error', ARGV[2], 'canceled_by', ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[1] .. ' canceled')
  local job = redis.call('HMGET', KEYS[1], 'vm', 'op')
  event('job', ARGV[1], job[1], job[2], 'canceled', ARGV[3], 'canceled before it ran')
  return 'canceled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[3])
  local job = redis.call('HMGET', KEYS[1], 'vm', 'op')
  event('job', ARGV[1], job[1], job[2], 'running', ARGV[3], 'cancel requested')
  return 'requested'
end
return state
"""

# Update fields of a VM record under its lock (reconciliation). Fenced; a deleted VM stays deleted.
# KEYS: vm record, fence, events(ns); ARGV: token, fields_json, vm, who
UPDATE_VM = _NOW + _EVENT + _FENCE + """
local refused = fenced(KEYS[2], ARGV[1])
if refused then return refused end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for field, value in pairs(cjson.decode(ARGV[2])) do
  redis.call('HSET', KEYS[1], field, value)
end
redis.call('HSET', KEYS[1], 'updated_at', now)
event('vm', '', ARGV[3], '', redis.call('HGET', KEYS[1], 'state'), ARGV[4], ARGV[2])
return 1
"""

# Read many hashes in one call: a listing of 10,000 VMs was 10,000 pipelined commands, whose
# packing and parsing cost the client more than Redis's work. Callers pass bounded batches of
# keys, so Redis is never blocked for long. KEYS: the hashes. Returns their fields flat, in order.
HGETALL_MANY = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGETALL', key)
end
return out
"""

# What a worker reads first under a VM's lock, in one step: the VM's unfinished jobs up to the
# message's job (by its seq), that job and the VM record. A job missing from the mailbox is final
# (or unknown): nothing to run for its message.
# LOCK: the caller holds vm:<ns>:<vm>. KEYS: mailbox, job, vm record; ARGV: job id
TURN = """
local seq = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seq then return {{}, {}, {}} end
return {redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', seq, 'WITHSCORES'), redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3])}
"""
