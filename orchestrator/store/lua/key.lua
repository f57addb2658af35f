-- Shared: a key the script can only name once it runs (a dependent's id, a VM's current host),
-- joined from one of keys.py's patterns (A.p, keys.lua_patterns()) and its names:
-- key(P.vm, 'default', 'web1') is keys.vm('default', 'web1'). No key is spelled in Lua.
local P = A.p
local function key(pattern, ...)
  local names = {...}
  local out = {pattern[1]}
  for i = 1, #names do
    out[#out + 1] = names[i]
    out[#out + 1] = pattern[i + 1]
  end
  return table.concat(out)
end
