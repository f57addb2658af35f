-- Shared: a write under a lock carries the token the holder got; it is refused when a newer one
-- was issued since (guarantee 3). nil: the token is current; else the refusal to return.
local function fenced(fence_key, token)
  local current = redis.call('GET', fence_key)
  if not current or tonumber(current) ~= tonumber(token) then
    return refuse('fenced_out', {what = 'lock', token = token, current = current or ''})
  end
  return nil
end
