-- Shared: history. Every script that changes a job or a VM appends what changed, in the same atomic
-- step, so history can't disagree with state. One change goes to three places, each of its own size
-- (A.caps: keys.py's EVENTS_MAX, VM_HISTORY_MAX, JOB_HISTORY_MAX):
--   the namespace's stream (stream, declared by the caller): its recent history, for a namespace-wide view;
--   the VM's own stream: what 'vm history' reads, so a busy VM can't push out another VM's history;
--   the job's own list (JSON arrays of keys.HISTORY_FIELDS): what 'job show' reads, gone with the job.
-- The VM's and the job's keys come from keys.py's patterns (key.lua), with the namespace that the
-- stream's key names. A job's list drops its oldest entries past its size and counts them in the
-- job record's history_trimmed; a stream counts what it trimmed itself (XINFO entries-added).
local function event(stream, kind, job, vm, op, state, by, detail)
  job = tostring(job)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', A.caps.events, '*', 'at', now, 'kind', kind, 'job', job,
    'vm', vm, 'op', op, 'state', state, 'by', by, 'detail', detail)
  local ns = string.sub(stream, #P.events[1] + 1, #stream - #P.events[2])
  if vm ~= '' then
    redis.call('XADD', key(P.vm_history, ns, vm), 'MAXLEN', '~', A.caps.vm, '*', 'at', now, 'kind', kind,
      'job', job, 'vm', vm, 'op', op, 'state', state, 'by', by, 'detail', detail)
  end
  if job ~= '' then
    local list = key(P.job_history, job)
    local n = redis.call('RPUSH', list, cjson.encode({id, now, kind, job, vm, op, state, by, detail}))
    if n > A.caps.job then
      redis.call('LTRIM', list, -A.caps.job, -1)
      redis.call('HINCRBY', key(P.job, job), 'history_trimmed', n - A.caps.job)
    end
  end
end
