"""B2: throughput of cheap operations on many VMs over 2 hosts, next to bare Celery no-op tasks
on bare workers with the same settings, pool and concurrency."""

from __future__ import annotations

import time

from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient

from .common import NS, bare_app, bare_batch, launch, require_succeeded
from .harness import Env
from .suite import Row, Sizes, at_least

TARGET = 0.7
HOSTS = ("b2h1", "b2h2")
BATCH = 200  # as 'vmorch vm pause web[1-200]' would submit them


def run(env: Env, sizes: Sizes) -> list[Row]:
    for h in HOSTS:
        env.worker(h)
        env.bare_worker(f"bare.{h}")
    env.wait_hosts(*HOSTS)
    client = RedisClient(env.settings)
    names = [f"vm{i}" for i in range(sizes.b2_vms)]
    launch(client, names, HOSTS)
    queues = [f"bare.{h}" for h in HOSTS]
    bare = bare_app(env.url, queues)

    # consecutive operations are on distinct VMs; each VM alternates pause and resume
    ops = [Operation.build(Op.PAUSE if (i // len(names)) % 2 == 0 else Op.RESUME, NS, names[i % len(names)])
           for i in range(sizes.b2_ops)]
    bare_s = bare_batch(bare, queues, sizes.b2_ops)
    t = time.perf_counter()
    ids: list[int] = []
    for start in range(0, len(ops), BATCH):
        ids += [j.id for j in client.submit(ops[start:start + BATCH])]
    require_succeeded(client.wait(ids, timeout=900))
    ours_s = time.perf_counter() - t
    ours, base = sizes.b2_ops / ours_s, sizes.b2_ops / bare_s
    return [Row("B2", f"throughput, {len(HOSTS)} hosts, {sizes.b2_vms} VMs, {sizes.b2_ops} ops", f"{ours:.0f} ops/s",
                f"{base:.0f} bare tasks/s", *at_least(ours / base, TARGET))]
