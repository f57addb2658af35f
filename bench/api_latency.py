"""POST a pause (or resume) + GET-wait until final over the HTTP API, next to the same through RedisClient.

    .venv/bin/python -m bench.api_latency [--n 200]

One Redis, one worker (test:///default), one API process (``vmorch api``, uvicorn); the
three paths are interleaved on the same VM so machine noise hits them alike:

* RedisClient: ``submit`` + ``wait`` (pubsub), as the CLI without ``VMORCH_API_URL``;
* HTTP: ``POST /api/v1/namespaces/bench/vms/vm1/pause`` + ``GET /api/v1/jobs/{id}/wait`` (httpx, keep-alive);
* HttpClient: the CLI's client over HTTP (``submit`` + ``wait``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from orchestrator.edge.httpclient import HttpClient
from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient
from orchestrator.store.redisconn import connect
from orchestrator.store.tokens import Role, TokenStore

from .harness import environment, free_port, percentile

Once = Callable[[], float]


def wait_api(http: httpx.Client, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if http.get("/api/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API never answered; see {log}")
        time.sleep(0.1)


def paths(client: RedisClient, http: httpx.Client, over_http: HttpClient) -> dict[str, Once]:
    ops = [Operation.build(op, "bench", "vm1") for op in (Op.PAUSE, Op.RESUME)]
    # every path alternates pause/resume; one counter keeps the VM's state right for the next one
    turn = [0]

    def next_op() -> Operation:
        turn[0] += 1
        return ops[(turn[0] - 1) % 2]

    def redis_once() -> float:
        op = next_op()
        t = time.perf_counter()
        [job] = client.submit([op])
        [done] = client.wait([job.id])
        assert done.state.value == "succeeded", done.error
        return time.perf_counter() - t

    def http_once() -> float:
        op = next_op()
        t = time.perf_counter()
        r = http.post(f"/api/v1/namespaces/bench/vms/vm1/{op.op.value}")
        assert r.status_code == 202, r.text
        done = http.get(f"{r.headers['location']}/wait", params={"timeout": 30}).json()
        assert done["state"] == "succeeded", done
        return time.perf_counter() - t

    def httpclient_once() -> float:
        op = next_op()
        t = time.perf_counter()
        [job] = over_http.submit([op])
        [done] = over_http.wait([job.id])
        assert done.state.value == "succeeded", done.error
        return time.perf_counter() - t

    return {"RedisClient submit + wait": redis_once, "HTTP POST + GET /wait (httpx)": http_once,
            "HttpClient submit + wait (CLI over HTTP)": httpclient_once}


def measure(n: int) -> dict[str, list[float]]:
    with environment() as env:
        env.worker("b1")
        port = free_port()
        env.spawn(sys.executable, "-m", "cli", "api", "--port", str(port), "--loglevel", "WARNING", log="api.log")
        env.wait_hosts("b1")
        url = f"http://127.0.0.1:{port}"
        secret, _ = TokenStore(connect(env.settings.resolved_redis_url())).create("bench", Role.OPERATE, ["bench"])
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
        wait_api(http, env.home / "api.log")
        client = RedisClient(env.settings)
        over_http = HttpClient(env.settings.model_copy(update={"api_url": url, "token": secret}))
        [launch] = client.submit([Operation.build(Op.LAUNCH, "bench", "vm1", memory_mib=32, disk_gib=0)])
        client.wait([launch.id])
        runs = paths(client, http, over_http)
        for _ in range(10):  # warm-up
            for once in runs.values():
                once()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(n):  # interleaved
            for name, once in runs.items():
                times[name].append(once())
        over_http.close()
        http.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    times = measure(args.n)
    table = Table(title=f"pause/resume submit -> final, n={args.n} each, interleaved (test:///default, 1 host)")
    for col in ("path", "p50 ms", "p99 ms", "ratio p50"):
        table.add_column(col, justify="left" if col == "path" else "right")
    base = percentile(times["RedisClient submit + wait"], 50)
    for name, values in times.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        table.add_row(name, f"{p50 * 1e3:.1f}", f"{p99 * 1e3:.1f}", f"{p50 / base:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
