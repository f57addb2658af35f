"""Layer 1, the model: the operation and its params, job/VM/host records, the error tree, names,
settings, logging and the process's metric hooks. Imports no other layer: no Redis, no libvirt."""
