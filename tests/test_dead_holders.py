"""A starting worker frees the locks of its host's dead processes at once (not after expiry)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from redis import Redis

from orchestrator.control.locks import vm_lock
from orchestrator.model.operation import Op
from orchestrator.model.records import JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .conftest import ops, start_worker, wait_hosts_up, wait_until


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_locks_of_dead_processes_of_this_host_are_freed_at_start(base_settings: Settings, client: RedisClient,
                                                                  redis: Redis) -> None:
    ns = client.settings.namespace
    worker = start_worker(base_settings, "dh")
    try:
        wait_hosts_up(base_settings, worker)
        [launch] = client.submit(ops(Op.LAUNCH, ns, "dv", memory_mib=32, host="dh"))
        client.wait([launch.id])
    finally:
        worker.stop()
    me = socket.gethostname()
    mine_dead = keys.lock_key(vm_lock(ns, "dv").name)
    mine_alive = keys.lock_key(vm_lock(ns, "alive").name)
    others = keys.lock_key(vm_lock(ns, "other").name)
    # As a SIGKILLed worker leaves it: a lock with a long expiry and an owner id naming a dead pid.
    dead_id = f"dh@{me}:{dead_pid()}:deadbeef"
    redis.set(mine_dead, dead_id, ex=300)
    redis.set(mine_alive, f"dh@{me}:{os.getpid()}:cafe", ex=300)   # a live process of this host: kept
    redis.set(others, f"dx@{me}:{dead_pid()}:f00d", ex=300)         # another host's lock: not ours to judge
    [kill] = client.submit(ops(Op.KILL, ns, "dv"))  # succeeds on the domain that died with the worker
    restarted = start_worker(base_settings, "dh")
    try:
        started = time.monotonic()
        wait_hosts_up(base_settings, restarted)
        [done] = client.wait([kill.id], timeout=30)
        took = time.monotonic() - started
        assert done.state is JobState.SUCCEEDED, done.error
        assert took < 15, f"the job waited {took:.1f}s: the dead holder's lock was not freed at start"
        assert redis.get(mine_alive) and redis.get(others)
        assert redis.get(mine_dead) != dead_id
        wait_until(lambda: not redis.exists(mine_dead), what="the VM lock to be released")
    finally:
        redis.delete(mine_alive, others)
        client.submit(ops(Op.DELETE, ns, "dv"))
        client.wait([j.id for j in client.jobs(ns)], timeout=30)
        restarted.stop()
