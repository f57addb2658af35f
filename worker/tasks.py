"""The one Celery task: a wake-up call for a VM's mailbox.

Its outcome, as Flower and ``celery events`` show it, is the outcome of the job it was sent for:
``{"job": ID, "state": "succeeded"}`` (also ``canceled``, or a state not final yet when the VM
moved and another host runs the job), or a Celery FAILURE (``JobFailed``: the job's error code and
message) when that job failed. A FAILURE is only a report: the job is final and the message is
acked, never retried nor redelivered (``JobFailed`` is in ``throws``, so Celery logs it as one
INFO line, without a traceback).

Task events (what Flower shows) are on only while a monitor keeps asking for them: Flower asks
every 5 s (``celery control enable_events``); a worker not started with ``--task-events`` turns them
off again when nobody asked for ``VMORCH_TASK_EVENTS_LEASE`` seconds (300).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, Task, bootsteps
from celery.worker import control
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from orchestrator.control.queue import RUN_TASK
from orchestrator.model import logs
from orchestrator.model.errors import LockError, NotFound
from orchestrator.model.records import JobState

from .runner import Worker, run_message

log = logging.getLogger(__name__)

EVENTS_LEASE_ENV = "VMORCH_TASK_EVENTS_LEASE"
#: seconds task events stay on after a monitor last asked for them (Flower asks every 5 s)
EVENTS_LEASE_DEFAULT = 300.0


class JobFailed(Exception):
    """The job a task was sent for failed: the task reports FAILURE (one string argument: serializable)."""


def register(app: Celery, worker: Worker) -> Any:
    @app.task(name=RUN_TASK, bind=True, max_retries=None, acks_late=True,  # type: ignore[untyped-decorator]
              reject_on_worker_lost=True, throws=(JobFailed,))
    def run(self: Task[Any, Any], namespace: str, vm: str, job_id: int) -> dict[str, Any]:
        try:
            with logs.bound(job=job_id, namespace=namespace, vm=vm):
                run_message(worker, namespace, vm, job_id)
        except (LockError, RedisConnectionError) as exc:
            # Nothing was written without the lock; try again (the job keeps its place in the order).
            log.warning("job %s: %s; retrying", job_id, exc)
            raise self.retry(exc=exc, countdown=1) from None
        return outcome(worker, job_id)

    if not app.conf.worker_send_task_events:
        lease_events(app)
    return run


def outcome(worker: Worker, job_id: int) -> dict[str, Any]:
    """The task's result: the job's state as it is now; raises ``JobFailed`` if the job failed."""
    try:
        job = worker.store.get_job(job_id)
    except (NotFound, RedisError) as exc:  # the job ran (or was not ours to run); only the report is missing
        return {"job": job_id, "state": "unknown", "why": str(exc)}
    if job.state is JobState.FAILED:
        code, message = (job.error.code, job.error.message) if job.error else ("failed", "")
        raise JobFailed(f"job {job_id} failed: {code}: {message}")
    return {"job": job_id, "state": job.state.value}


# -- task events: on only while a monitor asks -------------------------------------------------


class EventsLease:
    """When a monitor last asked for task events (``enable_events``), by this process's clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.asked_at = time.monotonic()

    def asked(self) -> None:
        self.asked_at = time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() - self.asked_at > self.seconds


_lease: EventsLease | None = None


def events_lease_seconds() -> float:
    raw = os.environ.get(EVENTS_LEASE_ENV, "").strip()
    try:
        seconds = float(raw) if raw else EVENTS_LEASE_DEFAULT
    except ValueError:
        seconds = EVENTS_LEASE_DEFAULT
    return seconds if seconds > 0 else EVENTS_LEASE_DEFAULT


def lease_events(app: Celery) -> None:
    """Task events turn off again once no monitor asked for them for the lease (see the module)."""
    global _lease
    _lease = EventsLease(events_lease_seconds())
    # The worker's own 'enable_events' control command, which notes when it was asked.
    control.control_command(name="enable_events")(_enable_events)
    app.steps["consumer"].add(_EventsLeaseStep)


def _enable_events(state: Any) -> Any:
    """Tell worker(s) to send task-related events (for the lease; see ``worker.tasks``)."""
    if _lease is not None:
        _lease.asked()
    return control.enable_events(state)


class _EventsLeaseStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Checks the lease on the consumer's timer and turns task events off when it ran out."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        if _lease is not None:
            interval = min(30.0, max(0.5, _lease.seconds / 4))
            self.tref = c.timer.call_repeatedly(interval, self.check, (c,), priority=10)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def check(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        if _lease is None or dispatcher is None or "task" not in (dispatcher.groups or ()) or not _lease.expired():
            return
        dispatcher.groups.discard("task")
        log.info("task events off: no monitor asked for them in the last %gs", _lease.seconds)
