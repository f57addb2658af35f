"""Guarantee 6 under a real network partition: a worker cut off from Redis stops acting on its VM
before anyone else may start, and never changes a domain after its lease ended.

One QEMU host's worker (``pq``) reaches Redis only through a test-owned TCP proxy
(``tests/netcut.py``); the test cuts it -- both directions, sockets left open, so the worker's
reads hang as in a real partition -- while that worker is in a slow ``vm stop --force`` (a
guest with no OS ignores ACPI: the stop waits its whole graceful timeout, then forces), and
submits more jobs for the VM during the cut. A second host (``pd``, libvirt's test driver) and
the test's client talk to Redis directly; ``pd``'s janitor fails the VM's jobs once ``pq`` is
past its host-down deadline. The cuts: shorter than the lease, longer than the lock's expiry but
shorter than the deadline, longer than the deadline. Redis, both workers and the proxy are this
module's own (a session worker's janitor would apply its own deadline to ``pq``'s jobs).

What is observed, and why it can be trusted:

* The worker's own record of every libvirt call that changes a domain (``worker.libvirtconn``
  logs one line per call, with the ``time.monotonic()`` at which it started and the end of the
  lease it ran under). CLOCK_MONOTONIC is one clock for every process of the machine, so these
  times compare with the test's cut and heal. A violation is a change that started after its
  lease ended, or one that started during the cut later than the lock's expiry after the cut
  (no renewal sent after the cut reached Redis before the heal, so the lock may be gone then,
  and the worker can't have taken another). Must be 0.
* Independent of the worker: QEMU itself, and the job's result. A thread of the test watches
  the VM's QEMU process: it must not end during the cut past the lock's expiry, and after a cut
  past the host-down deadline (the jobs failed) it must not end at all. After a cut past the
  lease, the stop's re-run (attempt 2) must find the VM running and force it off itself
  ("forced off after ..."), as recorded under its fence: had the cut-off attempt destroyed it
  after the heal, the re-run would find it off (or fail with "domain is not running").
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.operation import Op
from orchestrator.model.records import HostState, Job, JobState, VmState, domain_name
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import WorkerProc, assert_keyspace_clean, ops, start_worker, wait_hosts_up, wait_until
from .helpers import private_redis, qemu_pids
from .netcut import NetCut
from .test_ordering import assert_serialized_in_order
from .test_reliability import qemu_root

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")

EXPIRE = 4  # VMORCH_LOCK_EXPIRE, as in the report: the lease is 4 * 0.99 - 1 = 2.96 s
DOWN_AFTER = 3.0
DEADLINE = 12.0  # VMORCH_HOST_DOWN_DEADLINE
STOP_TIMEOUT_S = 3.0  # the graceful part of the stop: the forced power-off comes after it
CUT_AFTER_S = 0.5  # into the running stop, as in the report

_CHANGE = re.compile(r"libvirt change: (\S+) (\S+) fence=(\S+) start=([\d.]+) end=([\d.]+) lease_end=(\S+) (\w+)")


@dataclass(frozen=True)
class Change:
    call: str
    domain: str
    fence: int | None
    start: float
    end: float
    lease_end: float | None


def changes_in(log: Path, domain: str) -> list[Change]:
    out = []
    for m in _CHANGE.finditer(log.read_text(errors="replace")):
        if m.group(2) == domain:
            out.append(Change(m.group(1), m.group(2), None if m.group(3) == "-" else int(m.group(3)),
                              float(m.group(4)), float(m.group(5)),
                              None if m.group(6) == "-" else float(m.group(6))))
    return out


def alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())  # a zombie has none
    except OSError:
        return False


class ExitWatch:
    """Notes when a process ends (``time.monotonic()``), polling every 20 ms, in a thread of its own."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ended_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"exit-watch-{pid}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            if not alive(self.pid):
                self.ended_at = time.monotonic()
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


@dataclass
class Partition:
    settings: Settings
    redis: Redis
    client: RedisClient
    cut: NetCut
    cutoff: WorkerProc  # pq, behind the proxy
    direct: WorkerProc  # pd
    root: Path


@pytest.fixture(scope="module")
def partition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Partition]:
    workers: list[WorkerProc] = []
    with private_redis(tmp_path_factory.mktemp("redis-partition")) as server, NetCut(server.port) as cut, \
            qemu_root() as root:
        settings = Settings(redis_url=server.url, home=tmp_path_factory.mktemp("home-partition"),
                            lock_expire=EXPIRE, heartbeat_interval=0.5, host_down_after=DOWN_AFTER,
                            host_down_deadline=DEADLINE, wait_poll_interval=0.5, namespace="part")
        try:
            workers.append(start_worker(settings, "pq", f"qemu:///embed?root={root}", concurrency=2,
                                        env={"VMORCH_REDIS_URL": cut.url}))
            workers.append(start_worker(settings, "pd"))
            wait_hosts_up(settings, *workers, timeout=60)
            redis = Redis.from_url(server.url, decode_responses=True, socket_timeout=None)
            client = RedisClient(settings)
            yield Partition(settings, redis, client, cut, workers[0], workers[1], root)
            redis.close()
        finally:
            cut.heal()
            for w in workers:
                w.stop()  # by its PID


def _wait_jobs(client: RedisClient, ids: list[int], timeout: float) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [client.job(i) for i in ids]
        if all(j.state.final for j in jobs):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"jobs not final after {timeout}s: {[(j.id, j.op.value, j.state.value) for j in jobs]}")


def _host_up(client: RedisClient, name: str) -> bool:
    return any(h.name == name and h.state is HostState.UP for h in client.hosts())


# The cuts: shorter than the lease; past the lock's expiry, before the host-down deadline; past the deadline.
CUTS = [pytest.param(1.5, id="1.5s-shorter-than-the-lease"),
        pytest.param(7.0, id="7s-past-the-lock-expiry"),
        pytest.param(20.0, id="20s-past-the-host-down-deadline")]


@pytest.mark.qemu
@pytest.mark.slow
@needs_qemu
@pytest.mark.timeout(170)
@pytest.mark.parametrize("cut_s", CUTS)
def test_a_worker_cut_off_from_redis_never_changes_its_vm_after_its_lease(partition: Partition,
                                                                          cut_s: float) -> None:
    p, c = partition, partition.client
    ns, name = p.settings.namespace, f"v{int(cut_s * 10)}"
    domain = domain_name(ns, name)
    wait_hosts_up(p.settings, p.cutoff, p.direct, timeout=30)
    [launch] = c.submit(ops(Op.LAUNCH, ns, name, memory_mib=64, host="pq"))
    launched = _wait_jobs(c, [launch.id], 60)[0]
    assert launched.state is JobState.SUCCEEDED, launched.error
    [qemu] = qemu_pids(p.root)
    watch = ExitWatch(qemu)
    try:
        [stop] = c.submit(ops(Op.STOP, ns, name, timeout_s=STOP_TIMEOUT_S, force_after_timeout=True))
        wait_until(lambda: c.job(stop.id).state is JobState.RUNNING, timeout=30, what="the stop running")
        time.sleep(CUT_AFTER_S)
        t_cut = p.cut.blackhole()
        try:
            time.sleep(min(0.5, cut_s / 3))
            later = c.submit([*ops(Op.START, ns, name), *ops(Op.KILL, ns, name)])  # more jobs, during the cut
            time.sleep(max(0.0, t_cut + cut_s - time.monotonic()))
        finally:
            t_heal = p.cut.heal()
        ids = [stop.id, *(j.id for j in later)]
        jobs = _wait_jobs(c, ids, 90)
        wait_until(lambda: _host_up(c, "pq"), timeout=30, what="pq up again")
        recovered = time.monotonic() - t_heal
        # Give a late change every chance to show: the cut-off attempt's task is retried after the heal.
        time.sleep(2 * EXPIRE)
    finally:
        watch.close()

    changes = changes_in(p.cutoff.log, domain)
    after_lease = [ch for ch in changes if ch.lease_end is not None and ch.start > ch.lease_end]
    during_cut = [ch for ch in changes if t_cut + EXPIRE <= ch.start <= t_heal]
    unleased = [ch for ch in changes if ch.lease_end is None]
    print(f"\ncut {cut_s:g}s: {len(changes)} libvirt changes; started after their lease: {len(after_lease)}; "
          f"during the cut past the expiry: {len(during_cut)}; outside a lease: {len(unleased)}; "
          f"jobs final and host up {recovered:.2f}s after the heal; "
          f"QEMU ended {'never' if watch.ended_at is None else f'{watch.ended_at - t_heal:+.2f}s from the heal'}")
    for ch in changes:
        print(f"  {ch.call} fence={ch.fence} start={ch.start - t_cut:+.3f}s from the cut, "
              f"lease left {'-' if ch.lease_end is None else f'{ch.lease_end - ch.start:.3f}s'}")
    assert not after_lease, after_lease
    assert not during_cut, during_cut
    assert not unleased, unleased
    assert watch.ended_at is None or not (t_cut + EXPIRE <= watch.ended_at <= t_heal), "QEMU ended during the cut"

    stop_done = jobs[0]
    assert_serialized_in_order(jobs)
    shutdowns = [ch for ch in changes if ch.call == "shutdown"]
    first_fence = shutdowns[0].fence
    assert first_fence is not None
    if cut_s + CUT_AFTER_S >= DEADLINE:
        # The janitor failed them all; the cut-off worker, back, touched nothing (QEMU still runs).
        assert [j.state for j in jobs] == [JobState.FAILED] * 3, jobs
        assert all(j.error is not None and j.error.code == "host_down" for j in jobs), [j.error for j in jobs]
        assert alive(qemu) and watch.ended_at is None, "the cut-off worker powered the VM off after all"
        assert [ch.call for ch in changes if ch.start > t_cut] == [], "a libvirt change after the cut"
        assert c.vm(ns, name).state is VmState.RUNNING
    else:
        assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3, [(j.id, j.error) for j in jobs]
        assert c.vm(ns, name).state is VmState.SHUTOFF
        assert stop_done.result is not None and stop_done.result["changed"], stop_done.result
        assert str(stop_done.result["note"]).startswith("forced off after"), stop_done.result
        if cut_s > EXPIRE:
            # The cut-off attempt gave up; the re-run, under a newer fence, powered the VM off itself.
            assert stop_done.attempts == 2, stop_done
            destroys = [ch for ch in changes if ch.call == "destroy"]
            assert destroys and all(ch.fence is not None and ch.fence > first_fence and ch.start > t_heal
                                    for ch in destroys), destroys
            assert watch.ended_at is not None and watch.ended_at > t_heal
    # Clean up: the VM goes, with its QEMU; nothing of the namespace is left but history.
    [delete] = c.submit(ops(Op.DELETE, ns, name))
    assert _wait_jobs(c, [delete.id], 60)[0].state is JobState.SUCCEEDED
    wait_until(lambda: not qemu_pids(p.root), timeout=20, what="QEMU to exit")
    assert_keyspace_clean(p.redis, ns)


def test_a_newer_fencing_token_in_the_domain_stops_a_holder_before_it_changes_anything(tmp_path: Path) -> None:
    """The metadata check alone (whatever the lease says): the domain carries a token newer than the
    holder's, so another holder acted on it; the older one changes nothing and says so."""
    from orchestrator.model.errors import FencedOut
    from worker.driver import DomainSpec, Driver
    from worker.libvirtconn import Lease, under_lease

    drv = Driver("test:///default", tmp_path / "disks")
    ns = f"f{os.getpid()}"
    domain = domain_name(ns, "m1")
    seen: list[int] = []
    try:
        drv.launch(DomainSpec(namespace=ns, vm="m1", memory_mib=32, vcpus=1, disk_gib=0, fence=7))
        assert drv.status(domain).metadata["fence"] == 7
        far = lambda: time.monotonic() + 60  # noqa: E731
        with under_lease(Lease(fence=6, check=lambda: None, ends_at=far, newer_seen=seen.append)), \
                pytest.raises(FencedOut, match="token 7, newer than this holder's 6"):
            drv.pause(domain)
        assert seen == [7]
        assert drv.status(domain).state is VmState.RUNNING  # nothing changed
        with under_lease(Lease(fence=9, check=lambda: None, ends_at=far)):
            drv.pause(domain)  # a newer holder: its token goes into the domain first
        assert drv.status(domain).state is VmState.PAUSED
        assert drv.status(domain).metadata["fence"] == 9
        with under_lease(Lease(fence=8, check=lambda: None, ends_at=far)), pytest.raises(FencedOut):
            drv.set_metadata(domain, tags={"a": "b"})
        assert drv.status(domain).metadata["tags"] == {}
    finally:
        drv.delete(domain)
        drv.close()


def test_an_expired_lease_stops_a_holder_before_it_changes_anything(tmp_path: Path) -> None:
    from orchestrator.model.errors import LeaseExpired
    from worker.driver import DomainSpec, Driver
    from worker.libvirtconn import Lease, under_lease

    drv = Driver("test:///default", tmp_path / "disks")
    ns = f"e{os.getpid()}"
    domain = domain_name(ns, "m1")

    def expired() -> None:
        raise LeaseExpired("the lease ran out")

    try:
        drv.launch(DomainSpec(namespace=ns, vm="m1", memory_mib=32, vcpus=1, disk_gib=0, fence=3))
        with under_lease(Lease(fence=3, check=expired, ends_at=time.monotonic)):
            for call in (drv.pause, drv.kill, drv.delete):
                with pytest.raises(LeaseExpired):
                    call(domain)
            with pytest.raises(LeaseExpired):
                drv.launch(DomainSpec(namespace=ns, vm="m2", memory_mib=32, vcpus=1, disk_gib=0, fence=3))
        assert drv.status(domain).state is VmState.RUNNING
        assert drv.status(domain_name(ns, "m2")).state is VmState.MISSING
    finally:
        drv.delete(domain)
        drv.close()
