"""Pieces several benchmarks share: launching VMs through the client, a warmed-up bare Celery app, B1's
pause/resume round trip, B5's launch hosts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import Job, JobState
from orchestrator.services.client import RedisClient

from . import bare_celery

if TYPE_CHECKING:
    from celery import Celery

    from .harness import Env

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


def pause_resume(env: Env, host: str, label: str) -> tuple[Celery, Callable[[], float]]:
    """B1's setup: a worker ``host`` with a running VM, a bare Celery worker ``bare.<host>`` beside it.
    Returns the bare app and a function that times one vmorch job, submit→succeeded, pause and resume
    in turn (``label`` names the benchmark in its error)."""
    env.worker(host)
    env.bare_worker(f"bare.{host}")
    env.wait_hosts(host)
    client = RedisClient(env.settings)
    launch(client, ["vm1"], [host])
    bare = bare_app(env.url, [f"bare.{host}"])
    ops = [Operation.build(op, NS, "vm1") for op in (Op.PAUSE, Op.RESUME)]
    turn = 0

    def vmorch_once() -> float:
        nonlocal turn
        op, turn = ops[turn % 2], turn + 1
        t = time.perf_counter()
        [job] = client.submit([op])
        [done] = client.wait([job.id])
        took = time.perf_counter() - t
        if done.state.value != "succeeded":
            raise RuntimeError(f"{label} job {done.id} {done.state.value}: {done.error}")
        return took

    return bare, vmorch_once


def launch_hosts(env: Env, n: int) -> tuple[list[str], RedisClient]:
    """B5's launch setup: ``n`` test-driver hosts up, and a client whose placement may overcommit them
    (the test driver's node is small: 3 GiB, 16 CPUs)."""
    hosts = [f"l{i}" for i in range(n)]
    for h in hosts:
        env.worker(h)
    env.wait_hosts(*hosts)
    return hosts, RedisClient(env.settings.model_copy(update={"memory_allocation_ratio": 100.0,
                                                              "cpu_allocation_ratio": 100.0}))


def spread_launches(ns: str, n: int) -> list[Operation]:
    """B5's batch: ``n`` small test-driver VMs web0.. spread over the hosts."""
    return [Operation.build(Op.LAUNCH, ns, f"web{i}", memory_mib=16, disk_gib=0, spread=True) for i in range(n)]
