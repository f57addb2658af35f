-- Retention: remove finished jobs older than a cutoff, with their history. A parent goes with its
-- children, all or none; never a job an unfinished job depends on, never one still in a mailbox.
-- Everything is checked here, at the moment of deletion, so workers changing jobs meanwhile can't
-- race it (a final job never becomes unfinished again; an unfinished one is simply kept).
-- K: jobs (the namespace's index, scanned), delayed, released.
-- A: cutoff (epoch seconds: jobs finished at or before it go), limit (stop once this many jobs went),
--    vm_histories (the jobs' vm is a VM, whose history goes with it once deleted; not for image jobs),
--    dry (only check: return the groups' first jobs, delete nothing), and either roots (the ids to
--    check) or after + scan (look at up to scan jobs of K.jobs with ids above after, oldest first,
--    stopping at the first one submitted after the cutoff: none beyond it can be old).
-- A job whose parent still exists goes with its parent. A VM's history goes with the last job of the
-- VM when its record is gone (deleted) and the history has nothing newer than that job's end.
-- Returns {cursor (the last id looked at), done (1: nothing older to look at), kept (old final jobs
-- kept: an unfinished job needs them), removed ids... (dry: the groups' first ids)}.
local cutoff = tonumber(A.cutoff)

-- an unfinished job outside the group depends on this one
local function needed(id, group)
  for _, did in ipairs(redis.call('HKEYS', key(P.job_dependents, id))) do
    if not group[did] then
      local st = redis.call('HGET', key(P.job, did), 'state')
      if st and not is_final(st) then return true end
    end
  end
  return false
end

-- the job and its children as {id, namespace, vm, finished_at}, or nil if one of them must stay
local function group_of(id)
  local ids = {id}
  for _, c in ipairs(redis.call('ZRANGE', key(P.job_children, id), 0, -1)) do table.insert(ids, c) end
  local group = {}
  for _, m in ipairs(ids) do group[m] = true end
  local rows = {}
  for _, m in ipairs(ids) do
    local r = redis.call('HMGET', key(P.job, m), 'state', 'namespace', 'vm', 'finished_at')
    if r[1] then
      if not is_final(r[1]) then return nil end
      local ns, vm = r[2] or '', r[3] or ''
      if vm ~= '' and redis.call('ZSCORE', key(P.vm_mailbox, ns, vm), m) then return nil end
      if needed(m, group) then return nil end
      table.insert(rows, {m, ns, vm, tonumber(r[4]) or 0})
    end
  end
  return rows
end

local function remove(rows)
  for _, r in ipairs(rows) do
    local m, ns, vm, finished = r[1], r[2], r[3], r[4]
    redis.call('DEL', key(P.job, m), key(P.job_children, m), key(P.job_dependents, m), key(P.job_history, m))
    redis.call('ZREM', key(P.jobs, ns), m)
    redis.call('ZREM', K.delayed, m)
    redis.call('ZREM', K.released, m)
    if A.vm_histories and vm ~= '' and redis.call('EXISTS', key(P.vm, ns, vm)) == 0 then
      local history = key(P.vm_history, ns, vm)
      local last = redis.call('XREVRANGE', history, '+', '-', 'COUNT', 1)[1]
      -- the deleted VM's history has nothing newer than this job (1 s: the same step's entries)
      if last and tonumber(string.match(last[1], '^%d+')) <= (math.max(cutoff, finished) + 1) * 1000 then
        redis.call('DEL', history)
      end
    end
  end
end

local candidates
local done = 1
local cursor = tostring(A.after or 0)
if A.roots then
  candidates = {}
  for _, id in ipairs(A.roots) do table.insert(candidates, tostring(id)) end
else
  candidates = redis.call('ZRANGEBYSCORE', K.jobs, '(' .. cursor, '+inf', 'LIMIT', 0, A.scan)
  if #candidates == A.scan then done = 0 end
end
local out, kept, count = {}, 0, 0
for _, id in ipairs(candidates) do
  local d = redis.call('HMGET', key(P.job, id), 'state', 'finished_at', 'parent', 'submitted_at')
  if not A.roots and d[1] and (tonumber(d[4]) or 0) > cutoff then
    done = 1
    break
  end
  cursor = id
  if not d[1] and not A.dry then redis.call('ZREM', K.jobs, id) end  -- an index entry without its record
  local parent = d[3] or ''
  local with_parent = parent ~= '' and redis.call('EXISTS', key(P.job, parent)) == 1
  if d[1] and not with_parent and is_final(d[1]) and (tonumber(d[2]) or math.huge) <= cutoff then
    local rows = group_of(id)
    if not rows then
      kept = kept + 1
    else
      if A.dry then
        table.insert(out, id)
      else
        remove(rows)
        for _, r in ipairs(rows) do table.insert(out, r[1]) end
      end
      count = count + #rows
      if count >= A.limit then
        done = 0
        break
      end
    end
  end
end
if A.roots then done = 1 end
table.insert(out, 1, kept)
table.insert(out, 1, done)
table.insert(out, 1, cursor)
return out
