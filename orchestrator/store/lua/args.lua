-- Shared: every script takes one JSON object as ARGV[1] (built by orchestrator.store.scripts):
--   keys:  {name = index into KEYS}; each key the script declares, built by keys.py
--   final: the final job states (records.FINAL_STATES)
--   p:     key patterns for the keys a script can only name once it runs (keys.lua_patterns())
-- and the script's own fields. K is the declared keys by name.
local A = cjson.decode(ARGV[1])
local function keys_of(at)
  local out = {}
  for name, i in pairs(at) do out[name] = KEYS[i] end
  return out
end
local K = keys_of(A.keys)
local FINAL = {}
for _, st in ipairs(A.final) do FINAL[st] = true end
local function is_final(st)
  return FINAL[st] == true
end
