"""B3: several concurrent submitters on ONE VM (all serialized, in order), next to the same
operations submitted sequentially by one client; Redis commands per operation from INFO commandstats."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence

from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import Job
from orchestrator.services.client import RedisClient

from .common import NS, bare_app, bare_batch, launch, require_succeeded
from .harness import CommandCounter, Env, monitored
from .suite import Row, Sizes, at_least

TARGET = 0.8
MAX_COMMANDS = 30
HOST = "b3"


def check_in_order(jobs: Sequence[Job]) -> None:
    """Guarantee 1, checked on the result: one at a time, in seq order."""
    by_seq = sorted(jobs, key=lambda j: j.seq)
    for a, b in itertools.pairwise(by_seq):
        assert a.finished_at is not None and b.started_at is not None
        if b.started_at < a.finished_at:
            raise RuntimeError(f"B3: job {b.id} (seq {b.seq}) started before job {a.id} (seq {a.seq}) finished")


def _ops(n: int) -> list[Operation]:
    return [Operation.build(Op.PAUSE if i % 2 == 0 else Op.RESUME, NS, "one") for i in range(n)]


def sequential(client: RedisClient, n: int) -> float:
    t = time.perf_counter()
    ids = [client.submit([op])[0].id for op in _ops(n)]
    jobs = client.wait(ids, timeout=600)
    took = time.perf_counter() - t
    require_succeeded(jobs)
    check_in_order(jobs)
    return took


def concurrent(env: Env, n: int, submitters: int) -> float:
    clients = [RedisClient(env.settings) for _ in range(submitters)]
    ids: list[int] = []
    start = threading.Barrier(submitters + 1)

    def submit(c: RedisClient, share: list[Operation]) -> None:
        start.wait()
        mine = [c.submit([op])[0].id for op in share]
        ids.extend(mine)

    ops = _ops(n)
    threads = [threading.Thread(target=submit, args=(c, ops[i::submitters])) for i, c in enumerate(clients)]
    for th in threads:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    jobs = clients[0].wait(ids, timeout=600)
    took = time.perf_counter() - t
    require_succeeded(jobs)
    check_in_order(jobs)
    return took


def run(env: Env, sizes: Sizes) -> list[Row]:
    env.worker(HOST)
    env.bare_worker("bare.b3")
    env.wait_hosts(HOST)
    client = RedisClient(env.settings)
    launch(client, ["one"], [HOST])
    bare = bare_app(env.url, ["bare.b3"])
    counter = CommandCounter(env.url)
    n = sizes.b3_ops

    seq_s = sequential(client, n)
    counter.reset()
    conc_s = concurrent(env, n, sizes.b3_submitters)
    ours_cmds = sum(counter.count().values()) / n
    counter.reset()
    bare_batch(bare, ["bare.b3"], n)
    bare_cmds = sum(counter.count().values()) / n

    # the same window again under MONITOR, which tells commands sent from those run inside scripts
    with monitored(env.url, env.home / "monitor.log") as counts:
        before = counts()
        concurrent(env, n, sizes.b3_submitters)
        after = counts()
    sent, inside = ((a - b) / n for a, b in zip(after, before, strict=True))

    ours, base = n / conc_s, n / seq_s
    return [
        Row("B3", f"{sizes.b3_submitters} submitters, {n} ops on one VM, in order", f"{ours:.0f} ops/s",
            f"{base:.0f} ops/s, 1 sequential client", *at_least(ours / base, TARGET)),
        Row("B3", "Redis commands per operation (INFO commandstats, incl. inside Lua)", f"{ours_cmds:.1f}",
            f"{bare_cmds:.1f} per bare Celery task", None, f"≤ {MAX_COMMANDS}", ours_cmds <= MAX_COMMANDS),
        Row("B3", "  of which sent by clients: round trips per operation (MONITOR)", f"{sent:.1f}",
            f"(+{inside:.1f} run inside Lua scripts)", None, f"≤ {MAX_COMMANDS}", sent <= MAX_COMMANDS),
    ]
