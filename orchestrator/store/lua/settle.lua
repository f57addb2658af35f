-- Shared: what follows a job's final state, in the same atomic step. Its parent counts it (and
-- becomes final with its last child); the jobs waiting for it are released into their VMs'
-- mailboxes once all their dependencies are met, or fail at once when a dependency they needed to
-- succeed did not (and so on down the graph). The released jobs are returned as
-- {id, host, namespace, vm, ...} for the caller to wake, and noted in K.released so a wake-up lost
-- to a crash is sent again by a janitor.
-- Needs K.updates, K.released, K.delayed. The jobs it reaches (the parent, the dependents) and
-- their VMs are only known once it walks the graph, so their keys come from keys.py's patterns
-- (key.lua), not from KEYS.

-- A held job's turn: its place in its VM's order, or, if it asked for a delay, a time in
-- K.delayed (a janitor releases it then). d = HMGET state, held, namespace, vm, op, host, delay.
local function release(did, d, by, why, released)
  local dk = key(P.job, did)
  local delay = tonumber(d[7] or '') or 0
  if delay > 0 then
    local due = tonumber(now) + delay
    redis.call('HSET', dk, 'delay', '', 'not_before', string.format('%.6f', due))
    redis.call('ZADD', K.delayed, due, did)
    event(key(P.events, d[3]), 'job', did, d[4], d[5], 'queued', by, why .. '; starts in ' .. delay .. 's')
    return
  end
  local seq = redis.call('INCR', key(P.vm_seq, d[3], d[4]))
  local host = redis.call('HGET', key(P.vm, d[3], d[4]), 'host') or d[6]
  redis.call('HSET', dk, 'seq', seq, 'host', host, 'held', '')
  redis.call('ZADD', key(P.vm_mailbox, d[3], d[4]), seq, did)
  redis.call('ZADD', K.released, now, did)
  redis.call('PUBLISH', K.updates, did .. ' queued')
  event(key(P.events, d[3]), 'job', did, d[4], d[5], 'queued', by, why .. '; seq ' .. seq .. ' on host ' .. host)
  table.insert(released, did)
  table.insert(released, host)
  table.insert(released, d[3])
  table.insert(released, d[4])
end

-- A move-out that ends without moving its VM (failed, canceled, never sent, or failed with its
-- dependency) gives back the room its acceptance reserved on the target (submit_batch.lua: the job's
-- reserved_* fields); one that moved the VM made it the VM's (finish.lua).
local function unreserve_move(jid)
  local r = redis.call('HMGET', key(P.job, jid), 'reserved_on', 'reserved_mib', 'reserved_vcpus')
  if r[1] and r[1] ~= '' then
    redis.call('HINCRBY', key(P.host, r[1]), 'committed_mib', -tonumber(r[2]))
    redis.call('HINCRBY', key(P.host, r[1]), 'committed_vcpus', -tonumber(r[3]))
  end
end

-- parent: the job's parent if the caller read it already (nil: read it here)
local function settle(id, state, by, parent)
  local released = {}
  local work = {{id, state, parent}}
  while #work > 0 do
    local item = table.remove(work)
    local jid, st = item[1], item[2]
    local parent = item[3]
    if st ~= 'succeeded' then unreserve_move(jid) end
    if parent == nil then parent = redis.call('HGET', key(P.job, jid), 'parent') end
    if parent and parent ~= '' then
      local pk = key(P.job, parent)
      redis.call('HINCRBY', pk, 'n_' .. st, 1)
      local done = redis.call('HINCRBY', pk, 'n_final', 1)
      local n = redis.call('HMGET', pk, 'n_total', 'n_failed', 'n_canceled', 'namespace', 'state')
      if done >= tonumber(n[1]) and not is_final(n[5]) then
        local pst, err = 'succeeded', ''
        if tonumber(n[2] or '0') > 0 then
          pst = 'failed'
          err = cjson.encode({code = 'children_failed', message = n[2] .. ' of ' .. n[1] .. ' jobs failed'})
        elseif tonumber(n[3] or '0') > 0 then
          pst = 'canceled'
          err = cjson.encode({code = 'canceled', message = n[3] .. ' of ' .. n[1] .. ' jobs were canceled'})
        end
        redis.call('HSET', pk, 'state', pst, 'finished_at', now, 'error', err)
        redis.call('PUBLISH', K.updates, parent .. ' ' .. pst)
        event(key(P.events, n[4]), 'job', parent, '', 'bulk', pst, by, 'all ' .. n[1] .. ' jobs final')
        table.insert(work, {parent, pst})
      end
    end
    local edges = redis.call('HGETALL', key(P.job_dependents, jid))
    for i = 1, #edges, 2 do
      local did, kind = edges[i], edges[i + 1]
      local dk = key(P.job, did)
      local d = redis.call('HMGET', dk, 'state', 'held', 'namespace', 'vm', 'op', 'host', 'delay')
      if d[1] == 'queued' and d[2] == '1' then
        if st == 'succeeded' or kind == 'final' then
          if redis.call('HINCRBY', dk, 'deps_left', -1) <= 0 then
            release(did, d, by, 'dependencies met', released)
          end
        else
          local err = cjson.encode({code = 'dependency_failed', message = 'dependency ' .. jid .. ' failed'})
          redis.call('HSET', dk, 'state', 'failed', 'finished_at', now, 'error', err, 'held', '')
          redis.call('PUBLISH', K.updates, did .. ' failed')
          event(key(P.events, d[3]), 'job', did, d[4], d[5], 'failed', by, 'dependency ' .. jid .. ' ' .. st)
          table.insert(work, {did, 'failed'})
        end
      end
    end
  end
  return released
end
