-- Start (or restart, after a crash) an attempt.
-- K: job, fence, updates, events, parent (only for a child job). A: token, id, by, parent.
-- Returns {1, attempt}, or {0, state} if the job is already final.
-- Refused: fenced_out; not_found (what = 'job').
local refused = fenced(K.fence, A.token)
if refused then return refused end
local job = redis.call('HMGET', K.job, 'state', 'attempts', 'vm', 'op')
local state = job[1]
if state == false then return refuse('not_found', {what = 'job', job = A.id}) end
if is_final(state) then return {0, state} end
-- attempts only changes here, under the VM's lock and fenced: no increment of its own needed
local attempts = (tonumber(job[2]) or 0) + 1
redis.call('HSET', K.job, 'state', 'running', 'started_at', now, 'worker', A.by, 'attempts', attempts)
redis.call('PUBLISH', K.updates, A.id .. ' running')
if K.parent and redis.call('HGET', K.parent, 'state') == 'queued' then
  redis.call('HSET', K.parent, 'state', 'running', 'started_at', now)  -- its first child began
  redis.call('PUBLISH', K.updates, A.parent .. ' running')
end
event(K.events, 'job', A.id, job[3], job[4], 'running', A.by, 'attempt ' .. attempts .. ', fence ' .. A.token)
return {1, attempts}
