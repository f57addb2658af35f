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

Under the VM lock (guarantee 6): every Redis call is bounded by the lock's lease (the lock
module sets ``redisconn.bounded_by``), and every libvirt change is checked against it and
against the domain's own fencing token (``libvirtconn.under_lease``). Wake-ups (Celery messages)
are sent once the lock is released: a broker that does not answer must not hold the lock.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from orchestrator.control import deps, locks
from orchestrator.control.locks import Holding, LockManager, vm_lock
from orchestrator.control.queue import enqueue
from orchestrator.model import logs, metrics
from orchestrator.model.errors import Canceled, LockError, NotFound, OperationTimeout, VmGone, VmorchError
from orchestrator.model.operation import Op
from orchestrator.model.records import Job, JobState, Vm, VmState
from orchestrator.model.settings import Settings
from orchestrator.store.jobstore import Fence, Released, Store

from .driver import Driver
from .handlers import HANDLERS, Adjust, Context, Outcome, operation_of
from .libvirtconn import Lease, under_lease
from .watchdog import Watchdog

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """Everything one host's worker process shares between its threads."""

    settings: Settings
    host: str
    store: Store
    locks: LockManager
    driver: Driver
    watchdog: Watchdog
    #: a bytes client for the disk chunks of ``vm move``
    blobs: Redis
    #: to wake another host when a VM's next job runs there
    app: Celery | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{os.getpid()}"


#: how often (s) a running job re-reads whether someone asked to cancel it; a cancel is rare and
#: honoured at the job's next step, so a fast operation need not pay a round trip per step
CANCEL_POLL_S = 0.1


def run_message(w: Worker, namespace: str, vm: str, job_id: int) -> None:
    """Handle the message of one job: run the VM's mailbox up to and including it.

    The job is first read under the lock: a final job's message (a duplicate, or one whose
    job a worker draining an earlier message ran already) finds nothing to do there.
    """
    lock = vm_lock(namespace, vm)
    released: list[Released] = []  # jobs the ones run here released: woken once the lock is free
    elsewhere: str | None = None
    try:
        # Marked waiting only when it really waits: a free lock costs no extra script.
        with w.locks.hold(lock, timeout=w.settings.lock_wait_timeout,
                          on_wait=lambda: w.store.mark_waiting(namespace, job_id, w.name)) as holding:
            fence = holding.fence(lock)
            running = job_id
            try:
                # LOCK: vm -- the mailbox read here can only grow behind job_id's seq, never before it.
                locks.require(lock)
                turn = w.store.turn(namespace, vm, job_id)
                vm_now: Vm | NotFound | None = turn.vm
                for earlier_id, _seq in turn.pending:
                    holding.check()
                    running = earlier_id
                    current = turn.job if earlier_id == job_id and turn.job is not None else w.store.get_job(earlier_id)
                    elsewhere = _run_one(w, holding, fence, current, vm_now, released)
                    vm_now = None  # that job may have changed the VM: the next one reads it again
                    if elsewhere is not None:
                        # The VM lives on another host now (it moved): this whole request goes to it,
                        # once this lock is released (waiting for that host would hold it across hosts).
                        break
            except LockError:
                raise  # nothing is written without the lock: the task tries again
            except ResponseError as exc:  # Redis refused a command: retrying would fail the same way
                _fail_crashed(w, fence, running, exc, released)
            except RedisError:
                raise  # Redis is away for a moment: the task tries again
            except Exception as exc:
                _fail_crashed(w, fence, running, exc, released)
    finally:
        _wake_all(w, released)
    if elsewhere is not None:
        assert w.app is not None
        try:
            enqueue(w.app, elsewhere, namespace, vm, job_id)
        except Exception as exc:  # the task tries again: the mailbox still says where the VM is
            raise RedisConnectionError(f"could not hand job {job_id} over to {elsewhere}: {exc}") from exc


def _wake_all(w: Worker, released: list[Released]) -> None:
    """Wake the jobs released while the lock was held; a janitor sends what could not be sent."""
    if released and w.app is not None:
        try:
            deps.wake(w.app, w.store, released)
        except (RedisError, VmorchError) as exc:
            log.warning("wake-ups of %d released jobs not sent (a janitor sends them): %s", len(released), exc)


def _fail_crashed(w: Worker, fence: Fence, job_id: int, exc: Exception, released: list[Released]) -> None:
    """A bug (or a record vmorch can't read) stopped this job: fail it, or it would stay queued
    with nothing left to run it; the VM's later jobs keep their turn.

    # LOCK: the caller holds vm:<ns>:<vm> (``fence``).
    """
    log.error("job %s crashed in the worker:\n%s", job_id, traceback.format_exc())
    job = w.store.get_job(job_id)
    locks.require(vm_lock(job.namespace, job.vm))
    if job.state.final:
        return
    error = _internal(exc)
    released += w.store.finish(job, fence, JobState.FAILED, error=error, by=w.name).released
    metrics.job_finished(job, error)


def _internal(exc: Exception) -> VmorchError:
    return VmorchError(f"internal error: {type(exc).__name__}: {exc}", hint="see the worker's log")


def _load_vm(w: Worker, fence: Fence, job: Job, known: Vm | NotFound | None,
             released: list[Released] | None = None) -> Vm | None:
    """The VM record as stored (``known`` if it was read under the lock already); None if it is gone.

    # LOCK: the caller holds vm:<ns>:<vm> (``fence``).
    """
    locks.require(vm_lock(job.namespace, job.vm))
    assert released is not None, "the caller collects the jobs to wake once the lock is free"
    vm: Vm | None = None
    if isinstance(known, Vm):
        vm = known
    elif known is None:
        try:
            vm = w.store.get_vm(job.namespace, job.vm, as_stored=True)
        except NotFound:
            vm = None
    if vm is None:
        gone = VmGone(f"VM {job.vm!r} was deleted before this job's turn")
        released += w.store.finish(job, fence, JobState.FAILED, error=gone, by=w.name).released
        metrics.job_finished(job, gone)
    return vm


def _run_one(w: Worker, holding: Holding, fence: Fence, job: Job, known_vm: Vm | NotFound | None = None,
             released: list[Released] | None = None) -> str | None:
    """Run one job; or, if the VM lives on another host now, return that host without running it.

    ``known_vm``: the VM record read under the lock (a ``NotFound`` if it was missing), None to read it here.
    The jobs its end releases are added to ``released``, to be woken once the lock is free.
    # LOCK: the caller holds vm:<ns>:<vm> (``fence``).
    """
    if job.state.final:
        return None
    locks.require(vm_lock(job.namespace, job.vm))
    assert released is not None, "the caller collects the jobs to wake once the lock is free"
    logs.bind(job=job.id, op=job.op.value)
    if job.cancel_requested_by:
        released += w.store.finish(job, fence, JobState.CANCELED,
                                   error=Canceled(f"canceled by {job.cancel_requested_by}"), by=w.name).released
        metrics.job_finished(job, Canceled(""))
        return None
    vm = _load_vm(w, fence, job, known_vm, released)
    if vm is None:
        return None
    if vm.host != w.host:
        return vm.host
    if w.store.begin(job, fence, w.name) is None:
        return None
    metrics.job_began(job)
    log.info("job %s %s %s/%s seq=%s: running", job.id, job.op.value, job.namespace, job.vm, job.seq)

    started = time.monotonic()
    soft_limit = w.settings.job_soft_time_limit
    # BEGIN just started it, and a cancel before that cancels a job outright: nothing to read yet.
    cancel_read_at = started

    def check() -> None:
        nonlocal cancel_read_at
        holding.check()
        now = time.monotonic()
        if now - started > soft_limit:
            raise OperationTimeout(f"soft time limit of {soft_limit:g}s reached",
                                   hint="raise VMORCH_JOB_SOFT_TIME_LIMIT for long operations")
        if now - cancel_read_at >= CANCEL_POLL_S:
            cancel_read_at = now
            by = w.store.cancel_requested_by(job.id)
            if by:
                raise Canceled(f"canceled by {by} while running")

    w.watchdog.track(job, fence)
    try:
        ran = _execute(w, job, vm, check, holding, fence)
        if isinstance(ran, Outcome):
            error = None
            finished = w.store.finish(job, fence, JobState.SUCCEEDED, result=ran.result.to_json(),
                                      vm_update=ran.vm_update, delete_vm=ran.delete_vm, adjust=ran.adjust, by=w.name)
        else:
            error = ran.error
            state = JobState.CANCELED if isinstance(error, Canceled) else JobState.FAILED
            finished = w.store.finish(job, fence, state, error=error, vm_update=_observed(w, job, vm.domain, error),
                                      delete_vm=ran.delete_vm, adjust=ran.adjust, by=w.name)
        released += finished.released
    finally:
        w.watchdog.untrack(job)
    log.info("job %s %s %s/%s seq=%s: %s", job.id, job.op.value, job.namespace, job.vm, job.seq,
             "succeeded" if error is None else f"{error.code}: {error.message}")
    metrics.job_finished(job, error, time.monotonic() - started)
    return None


@dataclass(frozen=True)
class Failed:
    """A job's failure, and what it gives back: reservations, and the VM's name (a launch)."""

    error: VmorchError
    adjust: Adjust = ()
    delete_vm: bool = False


def _execute(w: Worker, job: Job, vm: Vm, check: Callable[[], None], holding: Holding,
             fence: Fence) -> Outcome | Failed:
    """Run the job's handler with the locks it declares; an error is returned, not raised.

    Lock errors are raised: nothing may be written without the lock, so the task retries
    and whoever holds the lock next re-runs the job. Its libvirt changes act under the
    lease of every lock it holds (``libvirtconn.under_lease``).
    # LOCK: the caller holds vm:<ns>:<vm> (``fence``).
    """
    assert isinstance(job.op, Op)  # a parent job is never in a mailbox
    handler = HANDLERS[job.op]
    ctx: Context[Any] | None = None
    try:
        # The operation is rebuilt once, here: the handler gets the params model the CLI built.
        ctx = handler.context(job, operation_of(job), vm, w.driver, check, fence_token=fence.token,
                              store=w.store, blobs=w.blobs, move_max_mib=w.settings.move_max_disk_mib)
        with w.locks.hold_declared(handler.locks(ctx), timeout=w.settings.lock_wait_timeout) as extra:
            def check_all() -> None:
                check()
                extra.check()

            def lease_check() -> None:
                holding.check()
                extra.check()

            def newer_token_seen(token: int) -> None:
                # Only a holder of this lock writes the domain's token: a higher one than Redis issued
                # means Redis lost the counter's last increments; the next holder must get past it.
                try:
                    w.locks.raise_fence(vm_lock(job.namespace, job.vm), token)
                except (RedisError, LockError) as exc:
                    log.warning("could not raise the fencing counter of %s/%s to %d: %s",
                                job.namespace, job.vm, token, exc)

            lease = Lease(fence=fence.token, check=lease_check,
                          ends_at=lambda: min(holding.lease_ends_at(), extra.lease_ends_at()),
                          newer_seen=newer_token_seen)
            ctx.check = check_all
            with under_lease(lease):
                outcome: Outcome = handler.run(ctx)
                check_all()
                if handler.leaves_domain_here and outcome.result.state is not VmState.MISSING:
                    # libvirt's own record says which lock generation last changed the domain
                    ctx.driver.set_metadata(ctx.vm.domain, fence=ctx.fence_token)
            return outcome
    except LockError:
        raise
    except Exception as exc:
        if not isinstance(exc, VmorchError):
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
        return Failed(exc if isinstance(exc, VmorchError) else _internal(exc),
                      handler.failure_adjust(ctx) if ctx is not None else (), handler.failure_deletes_vm)


def _observed(w: Worker, job: Job, domain: str, error: VmorchError) -> dict[str, str]:
    """After a failure the VM record takes libvirt's word for the state."""
    try:
        state = w.driver.status(domain).state
    except VmorchError:
        state = VmState.UNKNOWN
    return {"state": state.value}
