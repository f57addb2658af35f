"""A Redis restart (AOF on) loses no accepted job; workers and clients reconnect by themselves."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.model.operation import Op
from orchestrator.model.records import Job, JobState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import RedisServer, WorkerProc, free_port, ops, start_worker, wait_hosts_up, wait_until
from .test_ordering import assert_serialized_in_order


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[tuple[RedisServer, Settings, list[WorkerProc]]]:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    settings = Settings(redis_url=server.url, home=tmp_path / "home", lock_expire=4, heartbeat_interval=0.5,
                        host_down_after=3.0, host_down_deadline=60.0, wait_poll_interval=0.5, namespace="rr")
    settings.home.mkdir()
    workers = [start_worker(settings, "r1"), start_worker(settings, "r2")]
    try:
        wait_hosts_up(settings, *workers)
        yield server, settings, workers
    finally:
        for w in workers:
            w.stop()
        server.stop()


#: how long Redis stays down in each restart (the fault's length, not a wait for anything)
OUTAGE_S = 1.0


def test_a_redis_restart_loses_no_job(own_cluster: tuple[RedisServer, Settings, list[WorkerProc]]) -> None:
    server, settings, workers = own_cluster
    client = RedisClient(settings)
    launches = client.submit(ops(Op.LAUNCH, "rr", "rs[1-6]", memory_mib=32))
    launched = client.wait([j.id for j in launches], timeout=60)
    assert all(j.state is JobState.SUCCEEDED for j in launched), [(j.vm, j.host, j.error) for j in launched]
    accepted = [j.id for j in client.submit([o for _ in range(15) for o in ops(Op.PAUSE, "rr", "rs[1-6]")
                                             + ops(Op.RESUME, "rr", "rs[1-6]")])]
    for round_ in range(2):  # twice: kombu's reconnection has its own failure modes; the worker must outlive them
        def finished() -> int:
            return sum(j.state.final for j in client.store.get_jobs(accepted))

        # Redis goes while jobs run: once at least one more has finished since the last restart (or
        # all have: the second restart then tests the workers' reconnection alone)
        before = finished()
        wait_until(lambda b=before: finished() > b or finished() == len(accepted), timeout=30,
                   what=f"jobs running before restart {round_ + 1}")
        server.stop()   # SIGTERM: Redis writes its AOF and exits, as in an upgrade
        time.sleep(OUTAGE_S)  # the fault itself: Redis stays down this long
        server.start()  # same port, same directory
    before_second_batch = len(accepted)
    accepted += [j.id for j in client.submit(ops(Op.PAUSE, "rr", "rs[1-6]"))]  # the client reconnects
    jobs = client.wait(accepted, timeout=120)
    assert len(jobs) == len(accepted) > before_second_batch
    lost = [j.id for j in jobs if not j.state.final]
    assert not lost, f"jobs lost or stuck across the restart: {lost}"
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [
        (j.id, j.vm, j.host, j.seq, j.attempts, [(e.state, e.by, e.detail) for e in client.events("rr", job_id=j.id)])
        for j in jobs if j.error][:3]
    by_vm: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_vm[job.vm].append(job)
    for vm_jobs in by_vm.values():
        assert_serialized_in_order(vm_jobs)
    assert all(w.proc.poll() is None for w in workers), "a worker died with Redis"
    deletes = client.submit(ops(Op.DELETE, "rr", "rs[1-6]"))
    assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in deletes], timeout=60))
