"""Layer 2, the store: everything that lives in Redis. The key schema (``keys``, the only place a
key name is built), the Lua scripts, the job/VM/host store, connections, tokens, experiment runs,
disk transfers. Imports only the model."""
