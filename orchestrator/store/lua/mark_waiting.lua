-- A worker picked the message up; the job now waits for its turn. Only from queued, never while held
-- (a held job, dependencies not met, has no turn to wait for).
-- K: job, updates, events. A: id, by. Returns 1 if it changed, else 0.
if redis.call('HGET', K.job, 'state') == 'queued' and redis.call('HGET', K.job, 'held') ~= '1' then
  redis.call('HSET', K.job, 'state', 'waiting')
  redis.call('PUBLISH', K.updates, A.id .. ' waiting')
  local job = redis.call('HMGET', K.job, 'vm', 'op')
  event(K.events, 'job', A.id, job[1], job[2], 'waiting', A.by, 'waiting for its turn')
  return 1
end
return 0
