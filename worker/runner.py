"""Runs a VM's jobs in their accepted order: the per-VM mailbox, drained under the VM lock.

Why this design: Celery may deliver the messages of one VM out of order, twice, or after
a crash, and python-redis-lock is not FIFO. So the message carries no order at all. At
submit time one Lua script gives each job its per-VM ``seq`` and puts it in the VM's
mailbox (a sorted set by seq). A worker that receives the message of job J takes the VM
lock and runs every unfinished job of the mailbox with ``seq <= J.seq``, in seq order.

* Out of order: J's message arriving first runs the earlier jobs, then J; their own
  messages later find them final and do nothing.
* Duplicates and redelivery: a final job is skipped; a job found ``running`` is an
  attempt that died with its worker, and is run again (operations are idempotent).
* No slot waits for a job queued *behind* it: a worker only ever runs jobs accepted
  before the one it was given, so concurrency 1 cannot deadlock.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass

from orchestrator.errors import Canceled, LockError, NotFound, VmGone, VmorchError
from orchestrator.locks import Holding, LockManager, vm_lock
from orchestrator.operation import Op
from orchestrator.records import Job, JobState, VmState
from orchestrator.settings import Settings
from orchestrator.store import Fence, Store

from .driver import Driver
from .handlers import HANDLERS, Context, failure_note

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """Everything one host's worker process shares between its threads."""

    settings: Settings
    host: str
    store: Store
    locks: LockManager
    driver: Driver

    @property
    def name(self) -> str:
        return f"{self.host}:{os.getpid()}"


def run_message(w: Worker, namespace: str, vm: str, job_id: int) -> None:
    """Handle the message of one job: run the VM's mailbox up to and including it."""
    try:
        job = w.store.get_job(job_id)
    except NotFound:
        log.warning("message for unknown job %s ignored", job_id)
        return
    if job.state.final:
        return  # a duplicate, or already run by the worker that drained an earlier message
    w.store.mark_waiting(job_id)
    lock = vm_lock(namespace, vm)
    with w.locks.hold(lock, timeout=w.settings.lock_wait_timeout) as holding:
        fence = holding.fence(lock)
        # LOCK: vm -- the mailbox read here can only grow behind job_id's seq, never before it.
        for earlier_id, _seq in w.store.mailbox(namespace, vm, upto_seq=job.seq):
            holding.check()
            _run_one(w, holding, fence, w.store.get_job(earlier_id))


def _run_one(w: Worker, holding: Holding, fence: Fence, job: Job) -> None:
    """# LOCK: the caller holds vm:<ns>:<vm> (``fence``)."""
    if job.state.final:
        return
    if job.cancel_requested_by:
        w.store.finish(job, fence, JobState.CANCELED, error=Canceled(f"canceled by {job.cancel_requested_by}"))
        return
    if w.store.begin(job.id, fence, w.name) is None:
        return
    log.info("job %s %s %s/%s seq=%s: running", job.id, job.op.value, job.namespace, job.vm, job.seq)
    try:
        vm = w.store.get_vm(job.namespace, job.vm)
    except NotFound:
        w.store.finish(job, fence, JobState.FAILED,
                       error=VmGone(f"VM {job.vm!r} was deleted before this job's turn"))
        return

    def check() -> None:
        holding.check()
        by = w.store.cancel_requested_by(job.id)
        if by:
            raise Canceled(f"canceled by {by} while running")

    handler = HANDLERS[job.op]
    try:
        with w.locks.hold(*handler.extra_locks(job), timeout=w.settings.lock_wait_timeout) as extra:
            def check_all() -> None:
                check()
                extra.check()

            outcome = handler.run(Context(job, vm, w.driver, check_all, fence.token))
            check_all()
    except LockError:
        raise  # nothing may be written without the lock: the task retries, a new holder re-runs the job
    except Canceled as exc:
        w.store.finish(job, fence, JobState.CANCELED, error=exc, vm_update=_observed(w, job, vm.domain, exc))
        return
    except VmorchError as exc:
        log.info("job %s failed: %s", job.id, exc.message)
        w.store.finish(job, fence, JobState.FAILED, error=exc, vm_update=_observed(w, job, vm.domain, exc))
        return
    except Exception as exc:
        log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
        error = VmorchError(f"internal error: {type(exc).__name__}: {exc}")
        w.store.finish(job, fence, JobState.FAILED, error=error, vm_update=_observed(w, job, vm.domain, error))
        return
    w.store.finish(job, fence, JobState.SUCCEEDED, result=outcome.result, vm_update=outcome.vm_update,
                   delete_vm=outcome.delete_vm)
    log.info("job %s %s %s/%s seq=%s: succeeded", job.id, job.op.value, job.namespace, job.vm, job.seq)


def _observed(w: Worker, job: Job, domain: str, error: VmorchError) -> dict[str, str]:
    """After a failure the VM record takes libvirt's word for the state.

    Only a failed launch leaves a note: a refused pause says nothing new about the VM.
    """
    try:
        state = w.driver.status(domain).state
    except VmorchError:
        state = VmState.UNKNOWN
    update = {"state": state.value}
    if job.op is Op.LAUNCH:
        update["note"] = f"launch failed: {failure_note(error)}"
    return update
