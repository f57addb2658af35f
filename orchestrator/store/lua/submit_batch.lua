-- A whole batch of jobs, with their parent and dependencies, in one step: all of it or none.
-- LOCK: for launches the caller holds cmd:<ns>, vms:<ns> and the hosts' locks; for moves cmd:<ns>
-- and both hosts' locks.
-- K: job_next, namespaces, updates, released, delayed; with a parent: parent_jobs, parent_events;
--    with an idempotency key: idem (its value: the JSON list of the jobs made under it).
-- A: by, after ([{id, kind = 'ok'|'final', job, dependents}]: a job to wait for, its keys' indices),
--    after_text (their ids as JSON, stored with each job), delay (seconds once released),
--    fail_on_failed_dep (a dependency that already failed fails the jobs; else the batch is refused),
--    parent ({ns, params, retry_of?}, or absent),
--    jobs ([{t = 'plain'|'launch'|'move', ns, vm, op, params, retry_of?, k = {name = index into KEYS}:
--            vm, seq, mailbox, jobs, events; a launch: vms, namespace, host, host_vms; a move: target;
--            launch: host, mib, vcpus, disk, image, tags, nics (JSON), domain; move: in_params, source, target}])
-- The new jobs' ids (and the parent's) come from K.job_next here, so their keys come from keys.py's
-- patterns (key.lua).
-- Returns {parent id or 0, id, seq, host, job hash, id, seq, host, job hash, ...} (seq 0: held until its
-- dependencies are met; the job hash flat, as HGETALL gives it).
-- A key used before: {-1, its JSON list of job ids}, and nothing written (A.idem_ttl: how long a
-- key is kept).
-- Refused (nothing written): not_found (what = 'dependency' or 'vm'), already_exists (what = 'vm'),
-- invalid_input (what = 'dependency_failed' or 'moved'), no_capacity (what = 'quota': a namespace's
-- quota, P:namespace:<ns>'s quota_* fields, would be exceeded by its launches).
local by = A.by
if K.idem then
  local seen = redis.call('GET', K.idem)
  if seen then return {-1, seen} end
end
-- first every check, then every write
local waiting = {}
local failed_dep = nil
for _, d in ipairs(A.after) do
  local st = redis.call('HGET', KEYS[d.job], 'state')
  if not st then return refuse('not_found', {what = 'dependency', job = d.id}) end
  if is_final(st) and st ~= 'succeeded' and d.kind == 'ok' then
    if not A.fail_on_failed_dep then
      return refuse('invalid_input', {what = 'dependency_failed', job = d.id, state = st})
    end
    failed_dep = failed_dep or d.id
  end
  if not is_final(st) then table.insert(waiting, d) end
end
local count = 0
for _, j in ipairs(A.jobs) do
  j.K = keys_of(j.k)
  -- a VM's record and its name in the registry are written and deleted together: its host tells both
  j.at = redis.call('HGET', j.K.vm, 'host')
  if j.t == 'launch' and j.at then return refuse('already_exists', {what = 'vm', namespace = j.ns, vm = j.vm}) end
  if j.t ~= 'launch' and not j.at then return refuse('not_found', {what = 'vm', namespace = j.ns, vm = j.vm}) end
  if j.t == 'move' and j.at ~= j.source then
    return refuse('invalid_input', {what = 'moved', namespace = j.ns, vm = j.vm, host = j.source})
  end
  count = count + (j.t == 'move' and 2 or 1)
end

-- quotas: each namespace's limits against the sums of its VM records plus this batch's launches, read
-- here so two concurrent launches can't both take the last of one (the records are only read when a
-- limit is set: the namespace's VM keys come from keys.py's pattern, key.lua)
local asked = {}
for _, j in ipairs(A.jobs) do
  if j.t == 'launch' then
    local a = asked[j.ns] or {K = j.K, vms = 0, memory_mib = 0, vcpus = 0, disk_gib = 0}
    asked[j.ns] = a
    a.vms = a.vms + 1
    a.memory_mib = a.memory_mib + j.mib
    a.vcpus = a.vcpus + j.vcpus
    a.disk_gib = a.disk_gib + j.disk
  elseif j.op == 'set' and j.K.namespace then
    -- a resize asks for the difference to what its VM's record holds now
    local a = asked[j.ns] or {K = j.K, vms = 0, memory_mib = 0, vcpus = 0, disk_gib = 0}
    asked[j.ns] = a
    local want = cjson.decode(j.params)
    local now_has = redis.call('HMGET', j.K.vm, 'memory_mib', 'vcpus')
    if type(want.memory_mib) == 'number' then
      a.memory_mib = a.memory_mib + want.memory_mib - (tonumber(now_has[1]) or 0)
    end
    if type(want.vcpus) == 'number' then a.vcpus = a.vcpus + want.vcpus - (tonumber(now_has[2]) or 0) end
  end
end
local QUOTA = {'vms', 'memory_mib', 'vcpus', 'disk_gib'}
for ns, a in pairs(asked) do
  local q = redis.call('HMGET', a.K.namespace, 'quota_vms', 'quota_memory_mib', 'quota_vcpus', 'quota_disk_gib')
  if q[1] or q[2] or q[3] or q[4] then
    local has = {vms = 0, memory_mib = 0, vcpus = 0, disk_gib = 0}
    for _, name in ipairs(redis.call('SMEMBERS', a.K.vms)) do
      local r = redis.call('HMGET', key(P.vm, ns, name), 'memory_mib', 'vcpus', 'disk_gib')
      has.vms = has.vms + 1
      has.memory_mib = has.memory_mib + (tonumber(r[1]) or 0)
      has.vcpus = has.vcpus + (tonumber(r[2]) or 0)
      has.disk_gib = has.disk_gib + (tonumber(r[3]) or 0)
    end
    for i, f in ipairs(QUOTA) do
      -- only what grows is judged: shrinking never exceeds a quota, even one lowered below use
      if q[i] and a[f] > 0 and has[f] + a[f] > tonumber(q[i]) then
        return refuse('no_capacity', {what = 'quota', namespace = ns, resource = f, limit = tonumber(q[i]),
          has = has[f], asks = a[f]})
      end
    end
  end
end

local parent = ''
if A.parent then
  parent = redis.call('INCR', K.job_next)
  redis.call('HSET', key(P.job, parent), 'id', parent, 'op', 'bulk', 'namespace', A.parent.ns, 'vm', '',
    'host', '', 'state', 'queued', 'seq', 0, 'submitted_at', now, 'attempts', 0, 'params', A.parent.params,
    'n_total', count, 'n_final', 0, 'retry_of', A.parent.retry_of or '')
  redis.call('ZADD', K.parent_jobs, parent, parent)
  redis.call('PUBLISH', K.updates, parent .. ' queued')
  event(K.parent_events, 'job', parent, '', 'bulk', 'queued', by, count .. ' jobs')
end

local out = {parent == '' and 0 or parent}
local doomed = {}
local delay = A.delay or 0
local function new_job(j, op, params, host)
  local id = redis.call('INCR', K.job_next)
  local jk = key(P.job, id)
  -- its place in the VM's order, unless it is held (dependencies, delay) or doomed
  local seq = 0
  if not failed_dep and #waiting == 0 and delay <= 0 then seq = redis.call('INCR', j.K.seq) end
  redis.call('HSET', jk, 'id', id, 'op', op, 'namespace', j.ns, 'vm', j.vm, 'host', host, 'state', 'queued',
    'seq', seq, 'submitted_at', now, 'attempts', 0, 'params', params, 'parent', parent,
    'retry_of', j.retry_of or '', 'after', A.after_text)
  redis.call('ZADD', j.K.jobs, id, id)
  if parent ~= '' then redis.call('ZADD', key(P.job_children, parent), id, id) end
  if failed_dep then
    -- as if it had been waiting for it: it fails at once (settled below)
    local err = cjson.encode({code = 'dependency_failed', message = 'dependency ' .. failed_dep .. ' failed'})
    redis.call('HSET', jk, 'state', 'failed', 'finished_at', now, 'error', err)
    event(j.K.events, 'job', id, j.vm, op, 'failed', by, 'dependency ' .. failed_dep .. ' failed before it was accepted')
    table.insert(doomed, id)
  elseif #waiting > 0 then
    -- held: no place in the VM's order yet, so it holds up none of the VM's other jobs
    redis.call('HSET', jk, 'held', '1', 'deps_left', #waiting, 'delay', A.delay or '')
    for _, d in ipairs(waiting) do
      redis.call('HSET', KEYS[d.dependents], id, d.kind)
    end
    event(j.K.events, 'job', id, j.vm, op, 'queued', by, 'waits for jobs ' .. A.after_text)
  elseif delay > 0 then
    redis.call('HSET', jk, 'held', '1', 'deps_left', 0)
    release(id, {'queued', '1', j.ns, j.vm, op, host, delay}, by, 'accepted', {})
  else
    redis.call('ZADD', j.K.mailbox, seq, id)
    event(j.K.events, 'job', id, j.vm, op, 'queued', by, 'seq ' .. seq .. ' on host ' .. host)
  end
  redis.call('PUBLISH', K.updates, id .. ' queued')
  table.insert(out, id)
  table.insert(out, seq)
  table.insert(out, host)
  return id
end

for _, j in ipairs(A.jobs) do
  if j.t == 'plain' then
    new_job(j, j.op, j.params, j.at)
  elseif j.t == 'launch' then
    redis.call('SADD', j.K.vms, j.vm)
    redis.call('SADD', K.namespaces, j.ns)
    redis.call('HSETNX', j.K.namespace, 'created_at', now)  -- a first launch creates its namespace
    redis.call('SADD', j.K.host_vms, j.ns .. '/' .. j.vm)
    -- the reservation: placement decided under this host's lock, and it counts from now on
    redis.call('HINCRBY', j.K.host, 'committed_mib', j.mib)
    redis.call('HINCRBY', j.K.host, 'committed_vcpus', j.vcpus)
    redis.call('HSET', j.K.vm, 'name', j.vm, 'namespace', j.ns, 'host', j.host, 'state', 'missing',
      'memory_mib', j.mib, 'vcpus', j.vcpus, 'disk_gib', j.disk, 'image', j.image, 'tags', j.tags,
      'nics', j.nics, 'snapshots', '[]', 'domain', j.domain, 'created_at', now, 'updated_at', now, 'note', 'launch queued')
    event(j.K.events, 'vm', '', j.vm, 'launch', 'missing', by, 'registered on host ' .. j.host)
    new_job(j, 'launch', j.params, j.host)
  else
    -- what the VM holds now (reserve.lua) is reserved on the target at once (placement decided under
    -- its lock); the move-out job keeps what it took: finish.lua makes it the VM's once the VM moved,
    -- settle.lua gives it back if the move-out ends without moving it
    local mib, vcpus = held_by(j.K.vm)
    charge(j.K.target, mib, vcpus)
    local out_id = new_job(j, 'move-out', j.params, j.source)
    redis.call('HSET', key(P.job, out_id), 'reserved_on', j.target, 'reserved_mib', mib, 'reserved_vcpus', vcpus)
    new_job(j, 'move-in', j.in_params, j.target)
  end
end
for _, id in ipairs(doomed) do
  redis.call('PUBLISH', K.updates, id .. ' failed')
  settle(id, 'failed', by)  -- nothing waits for it yet: only its parent counts it
end
if K.idem then
  local ids = {}
  for i = 2, #out, 3 do table.insert(ids, out[i]) end
  redis.call('SET', K.idem, cjson.encode(ids), 'EX', A.idem_ttl)
end
-- each job as accepted, so the submitter needs no second round trip to read them back
local accepted = {out[1]}
for i = 2, #out, 3 do
  table.insert(accepted, out[i])
  table.insert(accepted, out[i + 1])
  table.insert(accepted, out[i + 2])
  table.insert(accepted, redis.call('HGETALL', key(P.job, out[i])))
end
return accepted
