-- An image job's end: the job final, its host's entry of the image set (or gone, after a removal,
-- with the image itself once no host has it: its record, its hosts and its own history), and the
-- image's record completed, in one fenced step; then settle.lua (its parent).
-- LOCK: the caller holds image:<name> (K.fence; no fence only for a job whose wake-up was never sent).
-- K: job, image, image_hosts, image_history, images, events, updates, released, delayed; fence
--    (absent: unsent).
-- A: token, id, name, host, state (the job's), host_state ('' = drop the entry), error and result
--    (stored as given), record ({field = value} for the image), by, detail.
-- Returns {1, released...} (see settle.lua), or {0} if the job was already final.
-- Refused: fenced_out; not_found (what = 'job').
if K.fence then
  local refused = fenced(K.fence, A.token)
  if refused then return refused end
end
local job = redis.call('HMGET', K.job, 'state', 'op', 'parent')
if job[1] == false then return refuse('not_found', {what = 'job', job = A.id}) end
if is_final(job[1]) then return {0} end
redis.call('HSET', K.job, 'state', A.state, 'finished_at', now, 'error', A.error, 'result', A.result)
event(K.events, 'job', A.id, A.name, job[2], A.state, A.by, A.detail)
local entry = redis.call('HGET', K.image_hosts, A.host)
local mine = entry and tostring(cjson.decode(entry).job) == tostring(A.id)
if mine and A.host_state == '' then
  redis.call('HDEL', K.image_hosts, A.host)
  if redis.call('HLEN', K.image_hosts) == 0 then
    -- its history too (this job's last entry was just added to it): a name imported again later
    -- starts a history of its own, and a removed image leaves no key behind
    redis.call('DEL', K.image, K.image_hosts, K.image_history)
    redis.call('SREM', K.images, A.name)
  end
elseif mine then
  local message = ''
  if A.error ~= '' then message = cjson.decode(A.error).message or '' end
  redis.call('HSET', K.image_hosts, A.host, cjson.encode({state = A.host_state, job = tonumber(A.id), error = message}))
end
if mine and next(A.record) ~= nil and redis.call('EXISTS', K.image) == 1 then
  local fields = {}
  for f, v in pairs(A.record) do
    table.insert(fields, f)
    table.insert(fields, v)
  end
  redis.call('HSET', K.image, unpack(fields))
end
redis.call('PUBLISH', K.updates, A.id .. ' ' .. A.state)
local released = settle(A.id, A.state, A.by, job[3] or '')
table.insert(released, 1, 1)
return released
