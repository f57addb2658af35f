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


# What follows a job's final state, in the same atomic step (P = the key prefix, ``keys.KEY_PREFIX``):
# its parent counts it (and becomes final with its last child); the jobs waiting for it are
# released into their VMs' mailboxes once all their dependencies are met, or fail at once when a
# dependency they needed to succeed did not (and so on down the graph). The released jobs are
# returned as {id, host, namespace, vm, ...} for the caller to wake, and noted in P:released
# so a wake-up lost to a crash is sent again by a janitor.
_SETTLE = """
local function ev(ns, kind, job, vm, op, state, by, detail)
  redis.call('XADD', P .. 'events:' .. ns, 'MAXLEN', '~', 100000, '*', 'at', now, 'kind', kind, 'job', job,
    'vm', vm, 'op', op, 'state', state, 'by', by, 'detail', detail)
end

local function is_final(st)
  return st == 'succeeded' or st == 'failed' or st == 'canceled'
end

-- A held job's turn: its place in its VM's order, or, if it asked for a delay, a time in P:delayed
-- (a janitor releases it then). d = HMGET state, held, namespace, vm, op, host, delay.
local function release(did, d, by, why, released)
  local dk = P .. 'job:' .. did
  local delay = tonumber(d[7] or '') or 0
  if delay > 0 then
    local due = tonumber(now) + delay
    redis.call('HSET', dk, 'delay', '', 'not_before', string.format('%.6f', due))
    redis.call('ZADD', P .. 'delayed', due, did)
    ev(d[3], 'job', did, d[4], d[5], 'queued', by, why .. '; starts in ' .. delay .. 's')
    return
  end
  local vk = P .. 'vm:' .. d[3] .. ':' .. d[4]
  local seq = redis.call('INCR', vk .. ':seq')
  local host = redis.call('HGET', vk, 'host') or d[6]
  redis.call('HSET', dk, 'seq', seq, 'host', host, 'held', '')
  redis.call('ZADD', vk .. ':mailbox', seq, did)
  redis.call('ZADD', P .. 'released', now, did)
  redis.call('PUBLISH', P .. 'updates', did .. ' queued')
  ev(d[3], 'job', did, d[4], d[5], 'queued', by, why .. '; seq ' .. seq .. ' on host ' .. host)
  table.insert(released, did)
  table.insert(released, host)
  table.insert(released, d[3])
  table.insert(released, d[4])
end

-- parent: the job's parent if the caller read it already (nil: read it here)
local function settle(id, state, by, parent)
  local released = {}
  local work = {{id, state, parent}}
  while #work > 0 do
    local item = table.remove(work)
    local jid, st = item[1], item[2]
    local parent = item[3]
    if parent == nil then parent = redis.call('HGET', P .. 'job:' .. jid, 'parent') end
    if parent and parent ~= '' then
      local pk = P .. 'job:' .. parent
      redis.call('HINCRBY', pk, 'n_' .. st, 1)
      local done = redis.call('HINCRBY', pk, 'n_final', 1)
      local n = redis.call('HMGET', pk, 'n_total', 'n_failed', 'n_canceled', 'namespace', 'state')
      if done >= tonumber(n[1]) and not is_final(n[5]) then
        local pst, err = 'succeeded', ''
        if tonumber(n[2] or '0') > 0 then
          pst = 'failed'
          err = cjson.encode({code = 'children_failed', message = n[2] .. ' of ' .. n[1] .. ' jobs failed'})
        elseif tonumber(n[3] or '0') > 0 then
          pst = 'canceled'
          err = cjson.encode({code = 'canceled', message = n[3] .. ' of ' .. n[1] .. ' jobs were canceled'})
        end
        redis.call('HSET', pk, 'state', pst, 'finished_at', now, 'error', err)
        redis.call('PUBLISH', P .. 'updates', parent .. ' ' .. pst)
        ev(n[4], 'job', parent, '', 'bulk', pst, by, 'all ' .. n[1] .. ' jobs final')
        table.insert(work, {parent, pst})
      end
    end
    local edges = redis.call('HGETALL', P .. 'job:' .. jid .. ':dependents')
    for i = 1, #edges, 2 do
      local did, kind = edges[i], edges[i + 1]
      local dk = P .. 'job:' .. did
      local d = redis.call('HMGET', dk, 'state', 'held', 'namespace', 'vm', 'op', 'host', 'delay')
      if d[1] == 'queued' and d[2] == '1' then
        if st == 'succeeded' or kind == 'final' then
          if redis.call('HINCRBY', dk, 'deps_left', -1) <= 0 then
            release(did, d, by, 'dependencies met', released)
          end
        else
          local err = cjson.encode({code = 'dependency_failed', message = 'dependency ' .. jid .. ' failed'})
          redis.call('HSET', dk, 'state', 'failed', 'finished_at', now, 'error', err, 'held', '')
          redis.call('PUBLISH', P .. 'updates', did .. ' failed')
          ev(d[3], 'job', did, d[4], d[5], 'failed', by, 'dependency ' .. jid .. ' ' .. st)
          table.insert(work, {did, 'failed'})
        end
      end
    end
  end
  return released
end
"""

# A worker picked the message up; the job now waits for its turn. Only from queued, never while held.
# KEYS: job, updates, events(ns); ARGV: id, worker
MARK_WAITING = _NOW + _EVENT + """
-- a held job (dependencies not met) has no turn to wait for
if redis.call('HGET', KEYS[1], 'state') == 'queued' and redis.call('HGET', KEYS[1], 'held') ~= '1' then
  redis.call('HSET', KEYS[1], 'state', 'waiting')
  redis.call('PUBLISH', KEYS[2], ARGV[1] .. ' waiting')
  local job = redis.call('HMGET', KEYS[1], 'vm', 'op')
  event('job', ARGV[1], job[1], job[2], 'waiting', ARGV[2], 'waiting for its turn')
  return 1
end
return 0
"""

# Start (or restart, after a crash) an attempt. Refused if the job is final or fenced out.
# KEYS: job, fence, updates, events(ns); ARGV: token, id, worker, job_prefix
BEGIN = _NOW + _EVENT + _FENCE + """
local refused = fenced(KEYS[2], ARGV[1])
if refused then return refused end
local job = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'parent', 'vm', 'op')
local state = job[1]
if state == false then return redis.error_reply('not_found') end
if state == 'succeeded' or state == 'failed' or state == 'canceled' then return {0, state} end
-- attempts only changes here, under the VM's lock and fenced: no increment of its own needed
local attempts = (tonumber(job[2]) or 0) + 1
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', now, 'worker', ARGV[3], 'attempts', attempts)
redis.call('PUBLISH', KEYS[3], ARGV[2] .. ' running')
local parent = job[3]
if parent and parent ~= '' and redis.call('HGET', ARGV[4] .. parent, 'state') == 'queued' then
  redis.call('HSET', ARGV[4] .. parent, 'state', 'running', 'started_at', now)  -- its first child began
  redis.call('PUBLISH', KEYS[3], parent .. ' running')
end
event('job', ARGV[2], job[4], job[5], 'running', ARGV[3], 'attempt ' .. attempts .. ', fence ' .. ARGV[1])
return {1, attempts}
"""

# Finish a job and apply its effect on the VM record, atomically and fenced.
# KEYS: job, fence, mailbox, vm record, vms(ns), host_vms, updates, events(ns)
# ARGV: token, id, state, error_json, result_json, vm_update_json ('' = none), delete_vm ('1'/'0'), member,
#       worker, detail, host_prefix, adjust_json ('' or [[host, mib, vcpus], ...]), key_prefix
# Returns {1, released...} (see _SETTLE), or {0} if the job was already final.
# A deleted VM gives its reservation back; a changed memory/vCPU count changes it; a moved VM
# changes host (adjust carries the reservations a move gives back).
FINISH = _NOW + "local P = ARGV[13]\n" + _EVENT + _FENCE + _SETTLE + """
local refused = fenced(KEYS[2], ARGV[1])
if refused then return refused end
local job = redis.call('HMGET', KEYS[1], 'state', 'op', 'parent', 'namespace')
if is_final(job[1]) then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return {0}
end
local op = job[2]
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', now, 'error', ARGV[4], 'result', ARGV[5])
redis.call('ZREM', KEYS[3], ARGV[2])
event('job', ARGV[2], ARGV[8], op, ARGV[3], ARGV[9], ARGV[10])
local update = ARGV[6] ~= '' and cjson.decode(ARGV[6]) or nil
-- the reservation counts only change on a delete, a resize or a move: only they read the record
local vm = {}
if ARGV[7] == '1' or (update and (update['memory_mib'] or update['vcpus'] or update['host'])) then
  vm = redis.call('HMGET', KEYS[4], 'host', 'memory_mib', 'vcpus')
end
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
  redis.call('SREM', KEYS[6], job[4] .. '/' .. ARGV[8])
  event('vm', ARGV[2], ARGV[8], op, 'deleted', ARGV[9], '')
elseif update and redis.call('EXISTS', KEYS[4]) == 1 then
  if update['memory_mib'] then
    redis.call('HINCRBY', ARGV[11] .. vm[1], 'committed_mib', tonumber(update['memory_mib']) - tonumber(vm[2]))
  end
  if update['vcpus'] then
    redis.call('HINCRBY', ARGV[11] .. vm[1], 'committed_vcpus', tonumber(update['vcpus']) - tonumber(vm[3]))
  end
  if update['host'] and update['host'] ~= vm[1] then
    local member = job[4] .. '/' .. ARGV[8]
    redis.call('SMOVE', ARGV[11] .. vm[1] .. ':vms', ARGV[11] .. update['host'] .. ':vms', member)
  end
  local fields = {'updated_at', now}
  for field, value in pairs(update) do
    table.insert(fields, field)
    table.insert(fields, value)
  end
  redis.call('HSET', KEYS[4], unpack(fields))
  event('vm', ARGV[2], ARGV[8], op, update['state'] or redis.call('HGET', KEYS[4], 'state'), ARGV[9], ARGV[6])
end
redis.call('PUBLISH', KEYS[7], ARGV[2] .. ' ' .. ARGV[3])
local released = settle(ARGV[2], ARGV[3], ARGV[9], job[3] or '')
table.insert(released, 1, 1)
return released
"""

# Cancel: a job not yet running is canceled at once; a running one is asked to stop.
# KEYS: job, mailbox, updates, events(ns); ARGV: id, error_json, who, key_prefix
# Returns {outcome, released...}: outcome 'canceled', 'requested' or the job's final state.
CANCEL = _NOW + "local P = ARGV[4]\n" + _EVENT + _SETTLE + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then return redis.error_reply('not_found') end
if state == 'queued' or state == 'waiting' then
  redis.call('HSET', KEYS[1], 'state', 'canceled', 'finished_at', now, 'error', ARGV[2], 'canceled_by', ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], ARGV[1] .. ' canceled')
  local job = redis.call('HMGET', KEYS[1], 'vm', 'op')
  event('job', ARGV[1], job[1], job[2], 'canceled', ARGV[3], 'canceled before it ran')
  local released = settle(ARGV[1], 'canceled', ARGV[3])
  table.insert(released, 1, 'canceled')
  return released
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[3])
  local job = redis.call('HMGET', KEYS[1], 'vm', 'op')
  event('job', ARGV[1], job[1], job[2], 'running', ARGV[3], 'cancel requested')
  return {'requested'}
end
return {state}
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

# A VM record as the JSON object of ``records.Vm``, built inside Redis: the client hands the whole
# listing to pydantic's JSON validator in one call, instead of building 10,000 dicts and records in
# Python (which cost more than Redis's work). Fields go out as the strings they are (pydantic reads
# numbers and epoch times from them), tags and snapshots as the JSON they are stored as, and empty
# fields not at all (the model's defaults).
_VM_JSON = """
local function vm_json(key)
  local h = redis.call('HGETALL', key)
  if #h == 0 then return nil end
  local parts = {}
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    if v ~= '' then
      if f == 'tags' or f == 'snapshots' then
        table.insert(parts, '"' .. f .. '":' .. v)
      else
        table.insert(parts, cjson.encode(f) .. ':' .. cjson.encode(v))
      end
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
"""

# Many VM records as one JSON array (missing ones left out). Callers pass bounded batches of keys,
# so Redis is never blocked for long. KEYS: the VM records.
VMS_JSON = _VM_JSON + """
local out = {}
for _, key in ipairs(KEYS) do
  local vm = vm_json(key)
  if vm then table.insert(out, vm) end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# A job accepted but whose wake-up could not be sent: final, so nothing waits for it forever.
# ARGV: key_prefix, id, error_json, who
FAIL_UNSENT = _NOW + "local P = ARGV[1]\n" + _SETTLE + """
local jk = P .. 'job:' .. ARGV[2]
local d = redis.call('HMGET', jk, 'state', 'namespace', 'vm', 'op')
if d[1] ~= 'queued' and d[1] ~= 'waiting' then return {} end
redis.call('HSET', jk, 'state', 'failed', 'finished_at', now, 'error', ARGV[3], 'held', '')
redis.call('ZREM', P .. 'vm:' .. d[2] .. ':' .. d[3] .. ':mailbox', ARGV[2])
redis.call('PUBLISH', P .. 'updates', ARGV[2] .. ' failed')
ev(d[2], 'job', ARGV[2], d[3], d[4], 'failed', ARGV[4], cjson.decode(ARGV[3])['message'])
return settle(ARGV[2], 'failed', ARGV[4])
"""

# A whole batch of jobs, with their parent and dependencies, in one step: all of it or none.
# Every key is derived from P, so the batch can touch any VM (vmorch targets one Redis, not a cluster).
# ARGV: key_prefix, request_json =
#   {who, parent?: {ns, params}, after: {dep id: "ok"|"final"}, after_json, delay?: seconds once released,
#    fail_on_failed_dep?: a dependency that already failed fails the jobs (else the batch is refused),
#    jobs: [{t: "plain"|"launch"|"move", ns, vm, op, params, retry_of?,
#            launch: host, mib, vcpus, disk, image, tags, domain; move: in_params, source, target}]}
# LOCK: for launches the caller holds cmd:<ns>, vms:<ns> and the hosts' locks; for moves cmd:<ns>
# and both hosts' locks.
# Returns {parent id or 0, id, seq, host, job hash, id, seq, host, job hash, ...} (seq 0: held until its
# dependencies are met; the job hash flat, as HGETALL gives it).
SUBMIT_BATCH = _NOW + "local P = ARGV[1]\n" + _SETTLE + """
local req = cjson.decode(ARGV[2])
local who = req.who
-- first every check, then every write
local waiting = {}
local failed_dep = nil
for dep, kind in pairs(req.after) do
  local st = redis.call('HGET', P .. 'job:' .. dep, 'state')
  if not st then return redis.error_reply('unknown_dep ' .. dep) end
  if (st == 'failed' or st == 'canceled') and kind == 'ok' then
    if not req.fail_on_failed_dep then return redis.error_reply('dep_failed ' .. dep .. ' ' .. st) end
    failed_dep = failed_dep or dep
  end
  if not is_final(st) then table.insert(waiting, {dep, kind}) end
end
local count = 0
for i, j in ipairs(req.jobs) do
  -- a VM's record and its name in the registry are written and deleted together: its host tells both
  j.at = redis.call('HGET', P .. 'vm:' .. j.ns .. ':' .. j.vm, 'host')
  if j.t == 'launch' and j.at then return redis.error_reply('already_exists ' .. i) end
  if j.t ~= 'launch' and not j.at then return redis.error_reply('not_found ' .. i) end
  if j.t == 'move' and j.at ~= j.source then return redis.error_reply('moved ' .. i) end
  count = count + (j.t == 'move' and 2 or 1)
end

local parent = ''
if req.parent then
  parent = redis.call('INCR', P .. 'job:next')
  redis.call('HSET', P .. 'job:' .. parent, 'id', parent, 'op', 'bulk', 'namespace', req.parent.ns, 'vm', '',
    'host', '', 'state', 'queued', 'seq', 0, 'submitted_at', now, 'attempts', 0, 'params', req.parent.params,
    'n_total', count, 'n_final', 0, 'retry_of', req.parent.retry_of or '')
  redis.call('ZADD', P .. 'jobs:' .. req.parent.ns, parent, parent)
  redis.call('PUBLISH', P .. 'updates', parent .. ' queued')
  ev(req.parent.ns, 'job', parent, '', 'bulk', 'queued', who, count .. ' jobs')
end

local out = {parent == '' and 0 or parent}
local doomed = {}
local function new_job(j, op, params, host)
  local id = redis.call('INCR', P .. 'job:next')
  local jk = P .. 'job:' .. id
  local vk = P .. 'vm:' .. j.ns .. ':' .. j.vm
  -- its place in the VM's order, unless it is held (dependencies, delay) or doomed
  local seq = 0
  if not failed_dep and #waiting == 0 and (req.delay or 0) <= 0 then seq = redis.call('INCR', vk .. ':seq') end
  redis.call('HSET', jk, 'id', id, 'op', op, 'namespace', j.ns, 'vm', j.vm, 'host', host, 'state', 'queued',
    'seq', seq, 'submitted_at', now, 'attempts', 0, 'params', params, 'parent', parent,
    'retry_of', j.retry_of or '', 'after', req.after_json)
  redis.call('ZADD', P .. 'jobs:' .. j.ns, id, id)
  if parent ~= '' then redis.call('ZADD', P .. 'job:' .. parent .. ':children', id, id) end
  if failed_dep then
    -- as if it had been waiting for it: it fails at once (the caller settles it below)
    local err = cjson.encode({code = 'dependency_failed', message = 'dependency ' .. failed_dep .. ' failed'})
    redis.call('HSET', jk, 'state', 'failed', 'finished_at', now, 'error', err)
    ev(j.ns, 'job', id, j.vm, op, 'failed', who, 'dependency ' .. failed_dep .. ' failed before it was accepted')
    table.insert(doomed, id)
  elseif #waiting > 0 then
    -- held: no place in the VM's order yet, so it holds up none of the VM's other jobs
    redis.call('HSET', jk, 'held', '1', 'deps_left', #waiting, 'delay', req.delay or '')
    for _, d in ipairs(waiting) do
      redis.call('HSET', P .. 'job:' .. d[1] .. ':dependents', id, d[2])
    end
    ev(j.ns, 'job', id, j.vm, op, 'queued', who, 'waits for jobs ' .. req.after_json)
  elseif (req.delay or 0) > 0 then
    redis.call('HSET', jk, 'held', '1', 'deps_left', 0)
    release(id, {'queued', '1', j.ns, j.vm, op, host, req.delay}, who, 'accepted', {})
  else
    redis.call('ZADD', vk .. ':mailbox', seq, id)
    ev(j.ns, 'job', id, j.vm, op, 'queued', who, 'seq ' .. seq .. ' on host ' .. host)
  end
  redis.call('PUBLISH', P .. 'updates', id .. ' queued')
  table.insert(out, id)
  table.insert(out, seq)
  table.insert(out, host)
end

for _, j in ipairs(req.jobs) do
  local vk = P .. 'vm:' .. j.ns .. ':' .. j.vm
  if j.t == 'plain' then
    new_job(j, j.op, j.params, j.at)
  elseif j.t == 'launch' then
    local hk = P .. 'host:' .. j.host
    redis.call('SADD', P .. 'vms:' .. j.ns, j.vm)
    redis.call('SADD', P .. 'ns', j.ns)
    redis.call('HSETNX', P .. 'namespace:' .. j.ns, 'created_at', now)  -- a first launch creates its namespace
    redis.call('SADD', hk .. ':vms', j.ns .. '/' .. j.vm)
    -- the reservation: placement decided under this host's lock, and it counts from now on
    redis.call('HINCRBY', hk, 'committed_mib', j.mib)
    redis.call('HINCRBY', hk, 'committed_vcpus', j.vcpus)
    redis.call('HSET', vk, 'name', j.vm, 'namespace', j.ns, 'host', j.host, 'state', 'missing',
      'memory_mib', j.mib, 'vcpus', j.vcpus, 'disk_gib', j.disk, 'image', j.image, 'tags', j.tags,
      'snapshots', '[]', 'domain', j.domain, 'created_at', now, 'updated_at', now, 'note', 'launch queued')
    ev(j.ns, 'vm', '', j.vm, 'launch', 'missing', who, 'registered on host ' .. j.host)
    new_job(j, 'launch', j.params, j.host)
  else
    local vm = redis.call('HMGET', vk, 'memory_mib', 'vcpus')
    redis.call('HINCRBY', P .. 'host:' .. j.target, 'committed_mib', vm[1])
    redis.call('HINCRBY', P .. 'host:' .. j.target, 'committed_vcpus', vm[2])
    new_job(j, 'move-out', j.params, j.source)
    new_job(j, 'move-in', j.in_params, j.target)
  end
end
for _, id in ipairs(doomed) do
  redis.call('PUBLISH', P .. 'updates', id .. ' failed')
  settle(id, 'failed', who)  -- nothing waits for it yet: only its parent counts it
end
-- each job as accepted, so the submitter needs no second round trip to read them back
local accepted = {out[1]}
for i = 2, #out, 3 do
  table.insert(accepted, out[i])
  table.insert(accepted, out[i + 1])
  table.insert(accepted, out[i + 2])
  table.insert(accepted, redis.call('HGETALL', P .. 'job:' .. out[i]))
end
return accepted
"""

# What a worker reads first under a VM's lock, in one step: the VM's unfinished jobs up to the
# message's job (by its seq), that job and the VM record. A job missing from the mailbox is final
# (or unknown): nothing to run for its message.
# LOCK: the caller holds vm:<ns>:<vm>. KEYS: mailbox, job, vm record; ARGV: job id
TURN = _VM_JSON + """
local seq = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seq then return {{}, {}, ''} end
return {redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', seq, 'WITHSCORES'), redis.call('HGETALL', KEYS[2]),
  vm_json(KEYS[3]) or ''}
"""

# The delayed jobs whose time has come (``SubmitOptions.delay_s``): their place in their VMs' order.
# ARGV: key_prefix, who. Returns the released jobs as _SETTLE does.
RELEASE_DUE = _NOW + "local P = ARGV[1]\n" + _SETTLE + """
local released = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now)) do
  redis.call('ZREM', P .. 'delayed', id)
  local d = redis.call('HMGET', P .. 'job:' .. id, 'state', 'held', 'namespace', 'vm', 'op', 'host', 'delay')
  if d[1] == 'queued' and d[2] == '1' then
    d[7] = ''
    release(id, d, ARGV[2], 'its delay is over', released)
  end
end
return released
"""
