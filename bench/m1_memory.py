"""M1: memory. What a job and a VM cost in Redis (``MEMORY USAGE``), and Redis's ``used_memory``
after 100,000 jobs with retention on (the workers' janitor call, ``retention.prune_once``, between
batches) against the same jobs kept for ever (the baseline, in a fresh Redis of the same run).

The jobs are synthesized through the real scripts, as a worker makes them, without workers or
libvirt: ``submit_batch`` (the submit path), ``begin`` and ``finish`` (with the VM record's change)
under a fencing token set by hand, on VMs registered by the real launch script. Each job is a
pause or a resume, so each leaves 4 history entries (queued, running, succeeded, the VM's change).
Retention is set so that about a tenth of the jobs is young enough to stay (from the fill rate
measured on the first batch): with a week's retention the same plateau is a week of jobs.
"""

from __future__ import annotations

import statistics
import time
from typing import cast

from redis import Redis

from orchestrator.control.locks import vm_lock
from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import Job, JobState
from orchestrator.services.client import RedisClient
from orchestrator.store import keys, retention
from orchestrator.store.jobstore import BatchEntry, Fence, Store

from .harness import Env, environment, percentile
from .suite import Row, Sizes, ms

NS = "mem"
HOST = "m0"
#: bytes a finished job may cost, its history included
JOB_MAX_BYTES = 1536
#: the longest a janitor's pass (1000 jobs removed) may block
PRUNE_MAX_S = 0.25
#: the longest 'vm history' may take, whatever the namespace's size
HISTORY_MAX_S = 0.01


def _memory(redis: Redis, key: str) -> int:
    return int(redis.memory_usage(key, samples=0) or 0)


def _used(redis: Redis) -> int:
    return int(cast(dict[str, int], redis.info("memory"))["used_memory"])


class Filler:
    """Jobs made as a worker makes them, one VM at a time round the VMs."""

    def __init__(self, env: Env, vms: int) -> None:
        self.client = RedisClient(env.settings.model_copy(update={"host_down_after": 3600.0}))
        self.store: Store = self.client.store
        self.redis: Redis = self.client.redis
        self.store.register_host(HOST, {"libvirt_uri": "test:///default", "cpus": 1 << 20,
                                        "memory_mib": 1 << 30, "pid": 0})
        self.names = [f"vm{i:05d}" for i in range(vms)]
        self.fences: dict[str, Fence] = {}
        self.paused: dict[str, bool] = {}
        for name in self.names:
            fence = Fence(keys.fence(vm_lock(NS, name).name), 1)
            self.redis.set(fence.key, fence.token)
            self.fences[name] = fence
            op = Operation.build(Op.LAUNCH, NS, name, memory_mib=64, disk_gib=0)
            _, [sub] = self.store.submit_batch([BatchEntry(op, host=HOST)], who="bench")
            self._run(sub.job, {"state": "running"})
            self.paused[name] = False
        self.made = 0

    def _run(self, job: Job, update: dict[str, str]) -> None:
        fence = self.fences[job.vm]
        self.store.begin(job, fence, "bench@m0")
        self.store.finish(job, fence, JobState.SUCCEEDED, result={"note": "bench"}, vm_update=update, by="bench@m0")

    def jobs(self, n: int) -> None:
        for _ in range(n):
            name = self.names[self.made % len(self.names)]
            op = Op.RESUME if self.paused[name] else Op.PAUSE
            _, [sub] = self.store.submit_batch([BatchEntry(Operation.build(op, NS, name))], who="bench")
            self.paused[name] = not self.paused[name]
            self._run(sub.job, {"state": "paused" if self.paused[name] else "running"})
            self.made += 1


def _per_job(redis: Redis, sample: list[int]) -> tuple[float, float, float]:
    """Bytes of a finished job: its record, its history list, its entry in the namespace's index."""
    record = statistics.mean(_memory(redis, keys.job(i)) for i in sample)
    history = statistics.mean(_memory(redis, keys.job_history(i)) for i in sample)
    return record, history, _memory(redis, keys.jobs(NS)) / max(1, int(redis.zcard(keys.jobs(NS))))


def with_retention(env: Env, sizes: Sizes) -> tuple[list[Row], int]:
    fill = Filler(env, sizes.m1_vms)
    redis, store = fill.redis, fill.store
    batch = max(1, min(1000, sizes.m1_jobs // 10))
    t = time.perf_counter()
    fill.jobs(batch)
    rate = batch / (time.perf_counter() - t)
    window = (sizes.m1_jobs // 10) / rate  # the retention: about a tenth of the jobs stays
    settings = env.settings.model_copy(update={"job_retention": window, "job_prune_batch": 1000})
    passes: list[float] = []
    removed = 0
    while fill.made < sizes.m1_jobs:
        fill.jobs(min(batch, sizes.m1_jobs - fill.made))
        t = time.perf_counter()
        report = retention.prune_once(store, settings)  # what each janitor pass does
        if report.removed:
            passes.append((time.perf_counter() - t) / report.removed * 1000)  # seconds per 1000 jobs
        removed += report.removed
    kept = int(redis.zcard(keys.jobs(NS)))
    ids = [int(i) for i in cast(list[str], redis.zrange(keys.jobs(NS), -200, -1))]
    record, history, index = _per_job(redis, ids)
    per_job = record + history + index
    vm = fill.names[0]
    used = _used(redis)
    lookups = []
    for name in fill.names[:50]:
        t = time.perf_counter()
        fill.client.history(NS, vm=name)
        lookups.append(time.perf_counter() - t)
    history_s = percentile(lookups, 50)
    vm_bytes = _memory(redis, keys.vm(NS, vm))
    vm_history = _memory(redis, keys.vm_history(NS, vm))
    entries = int(redis.xlen(keys.vm_history(NS, vm)))
    ns_stream = _memory(redis, keys.events(NS))
    ns_entries = int(redis.xlen(keys.events(NS)))
    per_1000 = statistics.median(passes) if passes else 0.0
    rows = [
        Row("M1", f"bytes per finished job: record {record:.0f} + its history {history:.0f} + index entry {index:.0f}",
            f"{per_job:.0f} B", "—", None, f"≤ {JOB_MAX_BYTES} B", per_job <= JOB_MAX_BYTES),
        Row("M1", f"bytes per VM: record; its history at {entries} entries (cap {keys.VM_HISTORY_MAX})",
            f"{vm_bytes} B; {vm_history / 1024:.0f} KiB", "—", None, "", None),
        Row("M1", f"the namespace's stream at {ns_entries} entries (cap {keys.EVENTS_MAX})",
            f"{ns_stream / 1024:.0f} KiB", "—", None, "", None),
        Row("M1", f"used_memory after {fill.made} jobs on {len(fill.names)} VMs, retention on "
                  f"({window:.1f} s ≈ {kept} jobs kept, {removed} removed)", f"{used / 2**20:.1f} MiB", "", None,
            "", None),
        Row("M1", "janitor pass (prune_once), per 1000 jobs removed", ms(per_1000), "—", None,
            f"≤ {ms(PRUNE_MAX_S)}", per_1000 <= PRUNE_MAX_S),
        Row("M1", f"vm history (newest 100) with {fill.made} jobs made, p50", ms(history_s), "—", None,
            f"≤ {ms(HISTORY_MAX_S)}", history_s <= HISTORY_MAX_S),
    ]
    return rows, used


def without_retention(env: Env, sizes: Sizes) -> tuple[int, int]:
    """The baseline: the same jobs, kept for ever. (used_memory, jobs)."""
    fill = Filler(env, sizes.m1_vms)
    fill.jobs(sizes.m1_jobs)
    return _used(fill.redis), int(fill.redis.zcard(keys.jobs(NS)))


def run(env: Env, sizes: Sizes) -> list[Row]:
    rows, used = with_retention(env, sizes)
    with environment() as fresh:
        baseline, jobs = without_retention(fresh, sizes)
    ratio = used / baseline
    rows[3] = Row("M1", rows[3].what, rows[3].ours, f"{baseline / 2**20:.1f} MiB ({jobs} jobs kept)", ratio,
                  "≤ 0.5×", ratio <= 0.5)
    return rows
