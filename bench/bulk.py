"""B-bulk: a 200-VM bulk command on test:///default across two hosts: the time to submit it
(one atomic batch with its parent job) and the time until its parent job is final.

    .venv/bin/python -m bench.bulk [--n 200] [--op start]
"""

from __future__ import annotations

import argparse
import time

from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient, SubmitOptions

from .harness import environment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    with environment() as env:
        env.worker("b1")
        env.worker("b2")
        env.wait_hosts("b1", "b2")
        client = RedisClient(env.settings)
        names = [f"vm{i}" for i in range(1, args.n + 1)]

        def bulk(op: Op, **params: object) -> tuple[float, float]:
            t = time.perf_counter()
            jobs = client.submit([Operation.build(op, "bench", n, **params) for n in names], SubmitOptions())
            submitted = time.perf_counter() - t
            parent = jobs[0].parent
            assert parent is not None
            [done] = client.wait([parent], timeout=600)
            assert done.state.value == "succeeded", done.error
            return submitted, time.perf_counter() - t

        launch = bulk(Op.LAUNCH, memory_mib=16, disk_gib=0, spread=True)
        bulk(Op.KILL)
        start = bulk(Op.START)
        for what, (sub, total) in (("launch", launch), ("start", start)):
            print(f"{args.n}-VM bulk {what} on 2 test-driver hosts: submit {sub * 1000:.0f} ms, "
                  f"parent final after {total:.2f} s")


if __name__ == "__main__":
    main()
