"""Prometheus metrics: what each process measures, and what the cluster's Redis says.

Two kinds, as Prometheus expects them:

* **Process metrics** live in this process (prometheus-client's default registry): jobs
  this worker finished by op and final state, job latencies, lock wait and hold times by
  level, fencing rejections. A worker serves them on ``--metrics-port``; sum them over
  workers in PromQL (``sum by (op, state) (rate(vmorch_jobs_finished_total[5m]))``).
* **Cluster metrics** are read from Redis at scrape time (``orchestrator.edge.clustermetrics``):
  jobs not yet final by host, op and state, Celery messages waiting per host queue, hosts
  up or down, their libvirt connection and clock offset. The API serves them with its own
  process metrics at ``/metrics`` through ``orchestrator.edge.clustermetrics.asgi_app``: scrape
  one API, not every worker.

The hooks below cost nothing until ``enable()`` (the worker and the API's ``asgi_app`` call it): the
CLI takes locks too, and must not pay for importing prometheus-client.

Queued→running latency is the worker's clock minus the job's ``submitted_at`` (Redis's
clock): keep hosts in time (``vmorch doctor`` checks the skew).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.model.records import JobState

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

    from orchestrator.model.errors import VmorchError
    from orchestrator.model.records import Job

log = logging.getLogger(__name__)

#: operations take from milliseconds (pause on the test driver) to minutes (a disk copied to another host)
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
LOCK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class Instruments:
    jobs_started: Counter
    jobs_finished: Counter
    job_queued_seconds: Histogram
    job_run_seconds: Histogram
    lock_wait_seconds: Histogram
    lock_hold_seconds: Histogram
    lock_timeouts: Counter
    fencing_rejections: Counter


_instruments: Instruments | None = None
_enable_lock = threading.Lock()


def enable() -> Instruments:
    """Create this process's metrics (once) in prometheus-client's default registry."""
    global _instruments
    with _enable_lock:
        if _instruments is None:
            from prometheus_client import Counter, Histogram

            _instruments = Instruments(
                jobs_started=Counter("vmorch_jobs_started", "Job attempts this process began", ["op"]),
                jobs_finished=Counter("vmorch_jobs_finished", "Jobs this process made final", ["op", "state"]),
                job_queued_seconds=Histogram("vmorch_job_queued_seconds", "From submitted to running (each attempt)",
                                             ["op"], buckets=JOB_BUCKETS),
                job_run_seconds=Histogram("vmorch_job_run_seconds", "From running to final", ["op", "state"],
                                          buckets=JOB_BUCKETS),
                lock_wait_seconds=Histogram("vmorch_lock_wait_seconds", "Time spent waiting to take a lock",
                                            ["level"], buckets=LOCK_BUCKETS),
                lock_hold_seconds=Histogram("vmorch_lock_hold_seconds", "Time a lock was held", ["level"],
                                            buckets=LOCK_BUCKETS),
                lock_timeouts=Counter("vmorch_lock_timeouts", "Lock waits that gave up", ["level"]),
                fencing_rejections=Counter("vmorch_fencing_rejections",
                                           "Writes refused because a newer lock holder exists"),
            )
        return _instruments


# -- hooks called by the worker, the lock manager and the store ---------------------------

def job_began(job: Job) -> None:
    if (m := _instruments) is None:
        return
    m.jobs_started.labels(job.op.value).inc()
    if job.submitted_at is not None:
        m.job_queued_seconds.labels(job.op.value).observe(max(0.0, time.time() - job.submitted_at.timestamp()))


def job_finished(job: Job, error: VmorchError | None, ran_for: float | None = None) -> None:
    """``ran_for`` is None for a job made final without running (canceled before its turn, VM gone)."""
    if (m := _instruments) is None:
        return
    from orchestrator.model.errors import Canceled

    state = JobState.SUCCEEDED if error is None else JobState.CANCELED if isinstance(error, Canceled) \
        else JobState.FAILED
    m.jobs_finished.labels(job.op.value, state.value).inc()
    if ran_for is not None:
        m.job_run_seconds.labels(job.op.value, state.value).observe(ran_for)


def lock_acquired(level: str, waited: float) -> None:
    if (m := _instruments) is not None:
        m.lock_wait_seconds.labels(level).observe(waited)


def lock_released(level: str, held_for: float) -> None:
    if (m := _instruments) is not None:
        m.lock_hold_seconds.labels(level).observe(held_for)


def lock_timed_out(level: str) -> None:
    if (m := _instruments) is not None:
        m.lock_timeouts.labels(level).inc()


def fenced_out() -> None:
    if (m := _instruments) is not None:
        m.fencing_rejections.inc()


# -- serving -------------------------------------------------------------------------------

def serve(port: int) -> None:
    """Serve this process's metrics on ``port`` (all interfaces) from a daemon thread."""
    from prometheus_client import start_http_server

    enable()
    start_http_server(port)
    log.info("metrics on :%d/metrics", port)
