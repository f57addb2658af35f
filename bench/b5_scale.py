"""B5: scale. 10,000 VMs registered on 20 hosts (written by the real launch script): how long
'vm list' and 'job list' take, through the client and as CLI commands end to end; and how
many test-driver VMs per second 4 hosts launch from one batch."""

from __future__ import annotations

import subprocess
import sys
import time

from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient
from orchestrator.store.jobstore import BatchEntry

from .common import launch_hosts, require_succeeded, spread_launches
from .harness import ROOT, Env, environment, percentile
from .suite import Row, Sizes

LIST_MAX_S = 0.5
LAUNCHES_MIN = 100
NS = "scale"


def _timed(fn: object, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return percentile(times, 50)


def _cli(env: Env, *args: str) -> float:
    def once() -> None:
        subprocess.run([sys.executable, "-m", "cli", "-n", NS, *args], cwd=ROOT, check=True,
                       env=env.env(VMORCH_HOST_DOWN_AFTER="3600"), stdout=subprocess.DEVNULL)
    return _timed(once, 3)


def registered(env: Env, sizes: Sizes) -> list[Row]:
    # hosts without workers: their heartbeat is only as fresh as their registration
    settings = env.settings.model_copy(update={"host_down_after": 3600.0})
    client = RedisClient(settings)
    hosts = [f"h{i:02d}" for i in range(sizes.b5_hosts)]
    for h in hosts:
        client.store.register_host(h, {"libvirt_uri": "test:///default", "cpus": 1024,
                                       "memory_mib": 1024 * 1024 * 1024, "pid": 0})
    t = time.perf_counter()
    for i in range(sizes.b5_vms):  # the launch script itself: VM record, registry, job, reservation
        op = Operation.build(Op.LAUNCH, NS, f"vm{i:05d}", memory_mib=64, disk_gib=0)
        client.store.submit_batch([BatchEntry(op, host=hosts[i % len(hosts)])], who="bench")
    fill = time.perf_counter() - t
    vms = client.vms(NS)
    assert len(vms) == sizes.b5_vms, len(vms)
    what = f"{sizes.b5_vms} VMs on {sizes.b5_hosts} hosts"
    rows = []
    for label, fn in ((f"vm list ({what}), client", lambda: client.vms(NS)),
                      (f"job list (newest 50 of {sizes.b5_vms}), client", lambda: client.jobs(NS))):
        s = _timed(fn)
        rows.append(Row("B5", label, f"{s:.3f} s", "—", None, f"≤ {LIST_MAX_S} s", s <= LIST_MAX_S))
    for label, args in ((f"vmorch vm list ({what}), CLI end to end", ("vm", "list")),
                        ("vmorch job list, CLI end to end", ("job", "list"))):
        s = _cli(env, *args)
        rows.append(Row("B5", label, f"{s:.3f} s", "—", None, f"≤ {LIST_MAX_S} s", s <= LIST_MAX_S))
    rows.append(Row("B5", f"registering {sizes.b5_vms} VMs (launch script, one by one)",
                    f"{sizes.b5_vms / fill:.0f} VMs/s", "—", None, "", None))
    return rows


def launches(env: Env, sizes: Sizes) -> list[Row]:
    hosts, client = launch_hosts(env, sizes.b5_launch_hosts)
    ops = spread_launches(NS, sizes.b5_launches)
    t = time.perf_counter()
    jobs = client.submit(ops)  # as 'vmorch vm launch web[1-1000]' does
    submitted = time.perf_counter() - t
    done = client.wait([j.id for j in jobs], timeout=900)
    took = time.perf_counter() - t
    require_succeeded(done)
    rate = sizes.b5_launches / took
    return [Row("B5", f"launch {sizes.b5_launches} VMs on {len(hosts)} hosts, one batch "
                      f"(accepted in {submitted:.2f} s)", f"{rate:.0f} VMs/s", "—", None,
                f"≥ {LAUNCHES_MIN} VMs/s", rate >= LAUNCHES_MIN)]


def run(env: Env, sizes: Sizes) -> list[Row]:
    rows = registered(env, sizes)
    with environment() as fresh:  # no 20 heartbeat-less hosts for the workers' janitors to chew on
        rows += launches(fresh, sizes)
    return rows
