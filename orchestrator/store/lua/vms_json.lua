-- Many VM records as one JSON array (missing ones left out). Callers pass bounded batches of keys,
-- so Redis is never blocked for long. KEYS: the VM records (no ARGV).
local out = {}
for _, vm_key in ipairs(KEYS) do
  local vm = vm_json(vm_key)
  if vm then table.insert(out, vm) end
end
return '[' .. table.concat(out, ',') .. ']'
