"""Fails the jobs of VMs whose host has been down past the deadline, so none waits forever.

Every worker runs one; they may overlap harmlessly: each VM is handled under its lock,
writes are fenced, and a job that is already final is left alone. If the host comes back
before the deadline, its worker runs the jobs as usual.
"""

from __future__ import annotations

import logging
import threading

from redis.exceptions import RedisError

from orchestrator.control import deps, locks
from orchestrator.control.locks import vm_lock
from orchestrator.model.errors import HostDown, LockError
from orchestrator.model.operation import Op
from orchestrator.model.records import HostState, JobState
from orchestrator.store import retention

from .runner import Worker

log = logging.getLogger(__name__)


def sweep(w: Worker) -> int:
    """One pass; returns how many jobs were failed."""
    failed = 0
    now = w.store.redis_time()
    for host in w.store.hosts():
        if host.state is not HostState.DOWN or host.heartbeat_at is None:
            continue
        if now - host.heartbeat_at.timestamp() < w.settings.host_down_deadline:
            continue
        for namespace, name in w.store.vms_on_host(host.name):
            if not w.store.mailbox(namespace, name):
                continue
            lock = vm_lock(namespace, name)
            released = []
            with w.locks.hold(lock, timeout=w.settings.lock_expire + 2) as holding:
                error = HostDown(f"host {host.name} is down",
                                 hint=f"it stopped heartbeating at {host.heartbeat_at:%Y-%m-%d %H:%M:%S}Z; "
                                      "restart its worker, then retry the job")
                locks.require(lock)  # LOCK: vm -- the mailbox can't change under it
                for job in w.store.get_jobs(i for i, _ in w.store.mailbox(namespace, name)):
                    # a launch that never ran gives its name and reservation back
                    finished = w.store.finish(job, holding.fence(lock), JobState.FAILED, error=error,
                                              delete_vm=job.op is Op.LAUNCH, by=f"janitor@{w.name}")
                    failed += finished.done
                    released += finished.released
            if released and w.app is not None:
                # after the lock: a broker that does not answer must not hold the VM's lock
                deps.wake(w.app, w.store, released)
    if failed:
        log.warning("failed %d jobs of hosts down for more than %.0fs", failed, w.settings.host_down_deadline)
    return failed


class Janitor:
    def __init__(self, worker: Worker, interval: float) -> None:
        self.worker = worker
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmorch-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sweep(self.worker)
                # Bounded batches (VMORCH_JOB_PRUNE_BATCH): a pass stays short however much is due.
                retention.prune_once(self.worker.store, self.worker.settings, self.worker.store.redis_time())
                if self.worker.app is not None:
                    deps.release_due(self.worker.app, self.worker.store, by=f"janitor@{self.worker.name}")
                    deps.resend(self.worker.app, self.worker.store)
            except (RedisError, LockError, OSError) as exc:
                # Redis restarting, a busy VM, or an archive that could not be written (then nothing
                # was pruned): next pass
                log.warning("janitor pass skipped: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # stop() also runs when start-up failed before start()
            self._thread.join(timeout=5)
