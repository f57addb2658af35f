"""B1: submit -> succeeded of a cheap operation (pause/resume on test:///default), p50 and p99,
next to a bare Celery task round trip on the same Redis, pool and worker settings.

    .venv/bin/python -m bench.latency [--n 200]
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from orchestrator.client import RedisClient
from orchestrator.operation import Op, Operation

from . import bare_celery
from .harness import environment, percentile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    with environment() as env:
        env.worker("b1")
        env.spawn(sys.executable, "-m", "bench.bare_celery", log="bare.log")
        env.wait_hosts("b1")
        client = RedisClient(env.settings)
        [launch] = client.submit([Operation.build(Op.LAUNCH, "bench", "vm1", memory_mib=32, disk_gib=0)])
        client.wait([launch.id])

        import os
        os.environ["VMORCH_REDIS_URL"] = env.settings.resolved_redis_url()
        bare = bare_celery.app()
        bare.send_task("bench.noop", queue=bare_celery.QUEUE).get(timeout=60)  # warm-up; waits for the worker

        def bare_once() -> float:
            t = time.perf_counter()
            bare.send_task("bench.noop", queue=bare_celery.QUEUE).get(timeout=30)
            return time.perf_counter() - t

        ops = [Operation.build(op, "bench", "vm1") for op in (Op.PAUSE, Op.RESUME)]

        def vmorch_once(i: int) -> float:
            t = time.perf_counter()
            [job] = client.submit([ops[i % 2]])
            [done] = client.wait([job.id])
            assert done.state.value == "succeeded", done.error
            return time.perf_counter() - t

        for i in range(10):  # warm-up both paths
            bare_once()
            vmorch_once(i)
        bare_times, vmorch_times = [], []
        for i in range(args.n):  # interleaved, so machine noise hits both alike
            bare_times.append(bare_once())
            vmorch_times.append(vmorch_once(i))

    table = Table(title=f"B1 submit -> final, n={args.n} (test:///default, 1 host, thread pool 4)")
    for col in ("what", "p50 ms", "p99 ms", "ratio p50", "ratio p99"):
        table.add_column(col, justify="right" if col != "what" else "left")
    b50, b99 = percentile(bare_times, 50), percentile(bare_times, 99)
    v50, v99 = percentile(vmorch_times, 50), percentile(vmorch_times, 99)
    table.add_row("bare Celery task round trip", f"{b50 * 1e3:.1f}", f"{b99 * 1e3:.1f}", "1.00", "1.00")
    table.add_row("vmorch pause/resume job", f"{v50 * 1e3:.1f}", f"{v99 * 1e3:.1f}", f"{v50 / b50:.2f}",
                  f"{v99 / b99:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
