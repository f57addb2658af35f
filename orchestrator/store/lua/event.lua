-- Shared: history. Every script that changes a job or a VM appends what changed to the namespace's
-- event stream, in the same atomic step, so history can't disagree with state.
local function event(stream, kind, job, vm, op, state, by, detail)
  redis.call('XADD', stream, 'MAXLEN', '~', 100000, '*', 'at', now, 'kind', kind, 'job', job,
    'vm', vm, 'op', op, 'state', state, 'by', by, 'detail', detail)
end
