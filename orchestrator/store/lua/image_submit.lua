-- Image jobs: one per host (under one parent job when there are several), in one step; each host's
-- entry of the image marked (importing or removing) with its job. A new image's record is written
-- here too. Image jobs are filed under the namespace keys.IMAGES_NS, their vm being the image's name.
-- LOCK: the caller holds image:<name>.
-- K: job_next, updates, image, image_hosts, images, jobs, events.
-- A: by, name, op ('image-import' | 'image-remove'), params (JSON text), hosts (names), state (of their
--    entries), record ({field = value} of a new image, or empty), label (the parent's).
-- Returns {parent id or 0, job hash, job hash, ...} (each flat, as HGETALL gives it).
local ns = string.sub(K.events, #P.events[1] + 1, #K.events - #P.events[2])
if next(A.record) ~= nil then
  local fields = {'name', A.name, 'created_at', now, 'by', A.by}
  for f, v in pairs(A.record) do
    table.insert(fields, f)
    table.insert(fields, v)
  end
  redis.call('HSET', K.image, unpack(fields))
  redis.call('SADD', K.images, A.name)
end
local parent = ''
if #A.hosts > 1 then
  parent = redis.call('INCR', K.job_next)
  redis.call('HSET', key(P.job, parent), 'id', parent, 'op', 'bulk', 'namespace', ns, 'vm', '', 'host', '',
    'state', 'queued', 'seq', 0, 'submitted_at', now, 'attempts', 0, 'n_total', #A.hosts, 'n_final', 0,
    'params', cjson.encode({ops = {A.op}, label = A.label}), 'retry_of', '')
  redis.call('ZADD', K.jobs, parent, parent)
  redis.call('PUBLISH', K.updates, parent .. ' queued')
  event(K.events, 'job', parent, '', 'bulk', 'queued', A.by, #A.hosts .. ' jobs')
end
local out = {parent == '' and 0 or parent}
for _, host in ipairs(A.hosts) do
  local id = redis.call('INCR', K.job_next)
  local jk = key(P.job, id)
  local seq = redis.call('HINCRBY', K.image, 'seq', 1)
  redis.call('HSET', jk, 'id', id, 'op', A.op, 'namespace', ns, 'vm', A.name, 'host', host, 'state', 'queued',
    'seq', seq, 'submitted_at', now, 'attempts', 0, 'params', A.params, 'parent', parent, 'retry_of', '',
    'after', '')
  redis.call('ZADD', K.jobs, id, id)
  if parent ~= '' then redis.call('ZADD', key(P.job_children, parent), id, id) end
  redis.call('HSET', K.image_hosts, host, cjson.encode({state = A.state, job = id, error = ''}))
  event(K.events, 'job', id, A.name, A.op, 'queued', A.by, 'on host ' .. host)
  redis.call('PUBLISH', K.updates, id .. ' queued')
  table.insert(out, redis.call('HGETALL', jk))
end
return out
