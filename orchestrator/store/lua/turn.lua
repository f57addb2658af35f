-- What a worker reads first under a VM's lock, in one step: the VM's unfinished jobs up to the
-- message's job (by its seq), that job and the VM record. A job missing from the mailbox is final
-- (or unknown): nothing to run for its message.
-- LOCK: the caller holds vm:<ns>:<vm>. K: mailbox, job, vm. A: id.
-- Returns {mailbox rows WITHSCORES, job hash flat, VM record as JSON or ''}.
local seq = redis.call('ZSCORE', K.mailbox, A.id)
if not seq then return {{}, {}, ''} end
return {redis.call('ZRANGEBYSCORE', K.mailbox, '-inf', seq, 'WITHSCORES'), redis.call('HGETALL', K.job),
  vm_json(K.vm) or ''}
