-- Shared: a VM record as the JSON object of records.Vm, built inside Redis: the client hands a whole
-- listing to pydantic's JSON validator in one call, instead of building 10,000 dicts and records in
-- Python (which cost more than Redis's work). Fields go out as the strings they are (pydantic reads
-- numbers and epoch times from them), tags, snapshots and NICs as the JSON they are stored as, and empty
-- fields not at all (the model's defaults).
local function vm_json(vm_key)
  local h = redis.call('HGETALL', vm_key)
  if #h == 0 then return nil end
  local parts = {}
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    if v ~= '' then
      if f == 'tags' or f == 'snapshots' or f == 'snapshot_details' or f == 'nics' then
        table.insert(parts, '"' .. f .. '":' .. v)
      else
        table.insert(parts, cjson.encode(f) .. ':' .. cjson.encode(v))
      end
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
