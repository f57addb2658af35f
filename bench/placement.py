"""Placement decision time with many hosts and VMs registered (issue: 50 hosts, 5,000 VMs).

Measures, in one run: the decision alone (what 'vm launch --dry-run' does), and the
decision with every lock a real launch takes (cmd, vms and one per candidate host),
next to a bare python-redis-lock acquire/release cycle as the baseline.

    .venv/bin/python -m bench.placement [--hosts 50] [--vms 5000] [--n 50]
"""

from __future__ import annotations

import argparse
import time

import redis_lock
from rich.console import Console
from rich.table import Table

from orchestrator.control.locks import cmd_lock, host_lock, vms_lock
from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient
from orchestrator.store.jobstore import BatchEntry
from orchestrator.store.redisconn import connect_for_locks

from .harness import environment, percentile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--n", type=int, default=50)
    args = parser.parse_args()
    with environment() as env:
        settings = env.settings.model_copy(update={"host_down_after": 3600.0, "namespace": "bench"})
        client = RedisClient(settings)
        for i in range(args.hosts):  # registered hosts; no worker needed to decide
            client.store.register_host(f"h{i:03d}", {"libvirt_uri": "test:///default", "cpus": 64,
                                                     "memory_mib": 1024 * 1024, "pid": 0})
        started = time.perf_counter()
        hosts = [f"h{i:03d}" for i in range(args.hosts)]
        for i in range(args.vms):
            op = Operation.build(Op.LAUNCH, "bench", f"vm{i}", memory_mib=64, disk_gib=0)
            client.store.submit_batch([BatchEntry(op, host=hosts[i % len(hosts)])])
        fill = time.perf_counter() - started
        probe = [Operation.build(Op.LAUNCH, "bench", "probe", memory_mib=64)]

        def decide() -> float:
            t = time.perf_counter()
            client.plan(probe)
            return time.perf_counter() - t

        def decide_locked() -> float:
            t = time.perf_counter()
            with client.locks.hold(cmd_lock("bench"), vms_lock("bench"), *[host_lock(h) for h in hosts], timeout=30):
                client._plan("bench", probe, locked=set(hosts))
            return time.perf_counter() - t

        bare_client = connect_for_locks(settings.resolved_redis_url())

        def bare_lock() -> float:
            t = time.perf_counter()
            lock = redis_lock.Lock(bare_client, "bench:bare", expire=10)
            lock.acquire()
            lock.release()
            return time.perf_counter() - t

        rows = []
        for name, fn in (("bare python-redis-lock cycle", bare_lock), ("decision only (--dry-run)", decide),
                         (f"decision + {args.hosts + 2} locks (a launch)", decide_locked)):
            fn()
            times = [fn() for _ in range(args.n)]
            rows.append((name, percentile(times, 50), percentile(times, 99)))
    table = Table(title=f"Placement with {args.hosts} hosts and {args.vms} VMs registered (filled in {fill:.1f}s)")
    for col in ("what", "p50 ms", "p99 ms", "x bare lock p50"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for name, p50, p99 in rows:
        table.add_row(name, f"{p50 * 1e3:.2f}", f"{p99 * 1e3:.2f}", f"{p50 / rows[0][1]:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
