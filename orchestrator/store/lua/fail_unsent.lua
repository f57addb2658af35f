-- A job accepted but whose wake-up could not be sent: final, so nothing waits for it forever.
-- K: job, mailbox, events, updates, released, delayed. A: id, error (stored as given), detail, by.
-- Returns the released jobs (settle.lua), or {} if the job had left queued/waiting already.
local d = redis.call('HMGET', K.job, 'state', 'vm', 'op')
if d[1] ~= 'queued' and d[1] ~= 'waiting' then return {} end
redis.call('HSET', K.job, 'state', 'failed', 'finished_at', now, 'error', A.error, 'held', '')
redis.call('ZREM', K.mailbox, A.id)
redis.call('PUBLISH', K.updates, A.id .. ' failed')
event(K.events, 'job', A.id, d[2], d[3], 'failed', A.by, A.detail)
return settle(A.id, 'failed', A.by)
