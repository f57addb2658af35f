-- Shared: a refusal, returned before anything is written. An error reply 'VMORCH <json>' whose
-- JSON has a code of vmorch's error tree (errors.py), what was refused ('job', 'vm', ...) and the
-- details; orchestrator.store.refusals raises the class of that code with the message users see
-- (a test checks every code and what used here has one).
local function refuse(code, details)
  details = details or {}
  details.code = code
  return {err = 'VMORCH ' .. cjson.encode(details)}
end
