-- Shared: the room a VM holds on its host, as placement counts it (the host's committed_mib and
-- committed_vcpus). For memory and for vCPUs each, it is the larger of what is set (memory_mib,
-- vcpus: the definition, what the next boot gets) and what the running guest has (memory_mib_live,
-- vcpus_live: '' or absent when the same, or when it is not running): memory set higher than the
-- running guest has yet taken is reserved at once, and memory or a vCPU the guest keeps after a
-- lower setting stays reserved until the guest gives it back. A VM that is off (shutoff, crashed)
-- runs nothing: a write that leaves it off drops its live values.
local HELD = {'memory_mib', 'vcpus', 'memory_mib_live', 'vcpus_live', 'state'}
local OFF = {shutoff = true, crashed = true}

-- r: a record's HELD fields, in that order. Returns MiB, vCPUs.
local function held(r)
  return math.max(tonumber(r[1]) or 0, tonumber(r[3]) or 0), math.max(tonumber(r[2]) or 0, tonumber(r[4]) or 0)
end

local function held_by(vm_key)
  return held(redis.call('HMGET', vm_key, unpack(HELD)))
end

-- What the VM holds before and after ``fields`` ({field = value}, about to be written to its record)
-- are written: MiB and vCPUs before, MiB and vCPUs after. ``fields`` gains the live values to drop
-- when the write leaves the VM off.
local function reheld(vm_key, fields)
  local was = redis.call('HMGET', vm_key, unpack(HELD))
  if OFF[fields.state or was[5]] then
    for i = 3, 4 do
      if was[i] and was[i] ~= '' then fields[HELD[i]] = '' end
    end
  end
  local will = {}
  for i = 1, 4 do
    if fields[HELD[i]] ~= nil then will[i] = fields[HELD[i]] else will[i] = was[i] end
  end
  local mib0, vcpus0 = held(was)
  local mib1, vcpus1 = held(will)
  return mib0, vcpus0, mib1, vcpus1
end

local function charge(host_key, mib, vcpus)
  if mib ~= 0 then redis.call('HINCRBY', host_key, 'committed_mib', mib) end
  if vcpus ~= 0 then redis.call('HINCRBY', host_key, 'committed_vcpus', vcpus) end
end
