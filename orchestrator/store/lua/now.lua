-- Shared: timestamps come from Redis's clock, so every host agrees on one clock.
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
