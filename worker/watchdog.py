"""The hard time limit: a job stuck inside a libvirt call past it takes its worker down.

A thread stuck in a C call can't be stopped, and its VM lock must not be freed while the
call may still change the VM. So, like Celery's prefork pool killing a child, the
watchdog fails the job (a fenced write: it still holds the lock) and exits the process.
Whatever restarts the worker (``vmorch up``'s supervisor, systemd) starts one that frees
the dead process's locks at once and re-runs the other jobs that were in flight.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.model.errors import OperationTimeout
from orchestrator.model.records import Job, JobState
from orchestrator.store.jobstore import Fence, Store

from .background import Background

log = logging.getLogger(__name__)

#: the worker's exit status when the hard time limit took it down (EX_TEMPFAIL)
EXIT_HARD_LIMIT = 75


@dataclass(frozen=True)
class _Running:
    job: Job
    fence: Fence
    started: float


class Watchdog(Background):
    thread_name = "watchdog"

    def __init__(self, store: Store, name: str, hard_limit: float,
                 exit_process: Callable[[int], object] = os._exit) -> None:
        self.store = store
        self.name = name
        self.hard_limit = hard_limit
        self._exit = exit_process
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        super().__init__()

    def track(self, job: Job, fence: Fence) -> None:
        with self._lock:
            self._running[job.id] = _Running(job, fence, time.monotonic())

    def untrack(self, job: Job) -> None:
        with self._lock:
            self._running.pop(job.id, None)

    def _loop(self) -> None:
        while not self._stop.wait(min(1.0, self.hard_limit / 4)):
            now = time.monotonic()
            with self._lock:
                overdue = [r for r in self._running.values() if now - r.started > self.hard_limit]
            if overdue:
                self._take_down(overdue)
                return

    def _take_down(self, overdue: list[_Running]) -> None:
        for r in overdue:
            error = OperationTimeout(f"hard time limit of {self.hard_limit:g}s reached; its worker was restarted",
                                     hint="the hypervisor did not answer; check the VM and its host")
            try:
                self.store.finish(r.job, r.fence, JobState.FAILED, error=error, by=f"watchdog@{self.name}")
            except Exception as exc:  # still exit: the stuck call must not outlive its lock
                log.error("could not fail job %s: %s", r.job.id, exc)
            log.critical("job %s exceeded the hard time limit (%gs): exiting so the worker restarts",
                         r.job.id, self.hard_limit)
        self._exit(EXIT_HARD_LIMIT)
