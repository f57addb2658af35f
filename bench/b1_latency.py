"""B1: submit -> succeeded of a cheap operation (pause/resume on test:///default), p50 and p99,
next to a bare Celery task round trip with the same broker, app settings, pool and worker flags."""

from __future__ import annotations

import time

from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient

from .common import NS, bare_app, bare_round_trip, launch
from .harness import Env, percentile
from .suite import Row, Sizes, at_most, ms

TARGET = 1.5


def run(env: Env, sizes: Sizes) -> list[Row]:
    env.worker("b1")
    env.bare_worker("bare.b1")
    env.wait_hosts("b1")
    client = RedisClient(env.settings)
    launch(client, ["vm1"], ["b1"])
    bare = bare_app(env.url, ["bare.b1"])
    ops = [Operation.build(op, NS, "vm1") for op in (Op.PAUSE, Op.RESUME)]

    def vmorch_once(i: int) -> float:
        t = time.perf_counter()
        [job] = client.submit([ops[i % 2]])
        [done] = client.wait([job.id])
        took = time.perf_counter() - t
        if done.state.value != "succeeded":
            raise RuntimeError(f"B1 job {done.id} {done.state.value}: {done.error}")
        return took

    for i in range(10):  # warm-up both paths
        bare_round_trip(bare, "bare.b1")
        vmorch_once(i)
    bare_times, ours = [], []
    for i in range(sizes.b1_n):  # interleaved, so machine noise hits both alike
        bare_times.append(bare_round_trip(bare, "bare.b1"))
        ours.append(vmorch_once(i))
    rows = []
    for p in (50, 99):
        b, o = percentile(bare_times, p), percentile(ours, p)
        rows.append(Row("B1", f"pause/resume submit→succeeded p{p} (n={sizes.b1_n})", ms(o),
                        f"{ms(b)} bare Celery round trip", *at_most(o / b, TARGET)))
    return rows
