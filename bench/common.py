"""Pieces several benchmarks share: launching VMs through the client, a warmed-up bare Celery app."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import Job, JobState
from orchestrator.services.client import RedisClient

from . import bare_celery

if TYPE_CHECKING:
    from celery import Celery

NS = "bench"


def launch(client: RedisClient, names: Sequence[str], hosts: Sequence[str], ns: str = NS) -> None:
    """Launch test-driver VMs pinned round-robin to ``hosts`` and wait until they all run."""
    ops = [Operation.build(Op.LAUNCH, ns, name, memory_mib=16, disk_gib=0, host=hosts[i % len(hosts)])
           for i, name in enumerate(names)]
    jobs = client.submit(ops)
    require_succeeded(client.wait([j.id for j in jobs], timeout=600))


def require_succeeded(jobs: Sequence[Job]) -> None:
    bad = [j for j in jobs if j.state is not JobState.SUCCEEDED]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed, e.g. {bad[0].id} {bad[0].state.value}: {bad[0].error}")


def bare_app(url: str, queues: Sequence[str]) -> Celery:
    """The baseline's client side; returns once every bare worker answered a task."""
    app = bare_celery.app(url)
    for queue in queues:
        app.send_task(bare_celery.TASK, queue=queue).get(timeout=60)
    return app


def bare_round_trip(app: Celery, queue: str) -> float:
    t = time.perf_counter()
    app.send_task(bare_celery.TASK, queue=queue).get(timeout=30)
    return time.perf_counter() - t


def bare_batch(app: Celery, queues: Sequence[str], n: int) -> float:
    """Send ``n`` no-op tasks round-robin over ``queues``; seconds until every result is in."""
    t = time.perf_counter()
    results: list[Any] = [app.send_task(bare_celery.TASK, queue=queues[i % len(queues)]) for i in range(n)]
    for r in results:
        r.get(timeout=600)
    return time.perf_counter() - t
