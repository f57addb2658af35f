-- Cancel: a job not yet running is canceled at once (then settle.lua); a running one is asked to stop.
-- K: job, mailbox, events, updates, released, delayed. A: id, error (stored as given), by.
-- Returns {outcome, released...}: outcome 'canceled', 'requested' or the job's final state.
-- Refused: not_found (what = 'job').
local state = redis.call('HGET', K.job, 'state')
if state == false then return refuse('not_found', {what = 'job', job = A.id}) end
if state == 'queued' or state == 'waiting' then
  redis.call('HSET', K.job, 'state', 'canceled', 'finished_at', now, 'error', A.error, 'canceled_by', A.by)
  redis.call('ZREM', K.mailbox, A.id)
  redis.call('PUBLISH', K.updates, A.id .. ' canceled')
  local job = redis.call('HMGET', K.job, 'vm', 'op')
  event(K.events, 'job', A.id, job[1], job[2], 'canceled', A.by, 'canceled before it ran')
  local released = settle(A.id, 'canceled', A.by)
  table.insert(released, 1, 'canceled')
  return released
end
if state == 'running' then
  redis.call('HSET', K.job, 'cancel_requested', A.by)
  local job = redis.call('HMGET', K.job, 'vm', 'op')
  event(K.events, 'job', A.id, job[1], job[2], 'running', A.by, 'cancel requested')
  return {'requested'}
end
return {state}
