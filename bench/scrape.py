"""How long the API's /metrics takes with a busy cluster: hosts, VMs and unfinished jobs in Redis.

Registers hosts (no workers, so every accepted launch stays queued, in its VM's mailbox and
in its host's Celery queue), then times scrapes of ``orchestrator.edge.clustermetrics.asgi_app`` next
to a scrape of this process's own metrics only (no Redis) as the baseline.

    .venv/bin/python -m bench.scrape [--hosts 50] [--vms 2000] [--n 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from prometheus_client import REGISTRY, generate_latest

from orchestrator.edge.clustermetrics import asgi_app
from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient

from .harness import environment, percentile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--vms", type=int, default=2000)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    with environment() as env:
        settings = env.settings.model_copy(update={"host_down_after": 3600.0, "namespace": "bench"})
        client = RedisClient(settings)
        for i in range(args.hosts):
            client.store.register_host(f"h{i:03d}", {"libvirt_uri": "test:///default", "cpus": 64,
                                                     "memory_mib": 1024 * 1024, "pid": 0, "libvirt_ok": "1"})
        for start in range(0, args.vms, 500):
            client.submit([Operation.build(Op.LAUNCH, "bench", f"vm{i}", memory_mib=64)
                           for i in range(start, min(args.vms, start + 500))])
        app = asgi_app(settings)

        async def scrape(c: httpx.AsyncClient) -> tuple[float, int]:
            started = time.perf_counter()
            r = await c.get("/metrics")
            return time.perf_counter() - started, len(r.content)

        async def run() -> tuple[list[float], int]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
                await scrape(c)
                results = [await scrape(c) for _ in range(args.n)]
            return [t for t, _ in results], results[-1][1]

        times, size = asyncio.run(run())
        local = []
        for _ in range(args.n):
            started = time.perf_counter()
            generate_latest(REGISTRY)
            local.append(time.perf_counter() - started)
        print(f"{args.hosts} hosts, {args.vms} VMs with one queued job each ({size} bytes of metrics)")
        print(f"cluster /metrics scrape: p50 {percentile(times, 50) * 1000:.1f} ms, "
              f"p95 {percentile(times, 95) * 1000:.1f} ms (n={args.n})")
        print(f"baseline, this process's metrics only: p50 {percentile(local, 50) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
