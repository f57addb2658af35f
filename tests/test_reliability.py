"""Guarantees 3 and 4 with real processes and real QEMU (the hypervisor outlives the worker):
cancel, time limits, a SIGKILLed worker, a SIGSTOPped worker, a lost lock."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.control.locks import vm_lock
from orchestrator.model.operation import Op
from orchestrator.model.records import Job, JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .conftest import WorkerProc, assert_keyspace_clean, ops, start_worker, wait_hosts_up, wait_until
from .helpers import private_redis, qemu_pids

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]


@contextmanager
def qemu_root() -> Iterator[Path]:
    # short: QEMU's monitor socket path under the root must fit in 108 bytes
    root = Path(tempfile.mkdtemp(prefix="vmq-"))
    try:
        yield root
    finally:
        leftover = qemu_pids(root)
        for pid in leftover:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"QEMU processes outlived the test: {leftover}"


class QemuHost:
    """One host on an embedded QEMU root; restartable, as a supervisor would."""

    def __init__(self, settings: Settings, name: str, root: Path, **env: str) -> None:
        self.settings, self.name, self.root = settings, name, root
        self.env = {f"VMORCH_{k.upper()}": v for k, v in env.items()}
        self.worker: WorkerProc | None = None

    @property
    def uri(self) -> str:
        return f"qemu:///embed?root={self.root}"

    def start(self) -> WorkerProc:
        self.worker = start_worker(self.settings, self.name, self.uri, concurrency=2, env=self.env)
        wait_hosts_up(self.settings, self.worker, timeout=60)
        return self.worker

    def stop(self) -> None:
        if self.worker:
            self.worker.stop()


@contextmanager
def qemu_host(settings: Settings, name: str, client: RedisClient, **env: str) -> Iterator[QemuHost]:
    with qemu_root() as root:
        host = QemuHost(settings, name, root, **env)
        host.start()
        try:
            yield host
        finally:
            if host.env:  # the test's tight limits would fail the cleanup's own jobs
                host.env.clear()
                host.stop()
            if host.worker is None or host.worker.proc.poll() is not None:
                host.start()
            # delete what the test left while the host is up, then stop it
            ns = client.settings.namespace
            names = client.store.vm_names(ns)
            failed: list[object] = []
            if names:
                jobs = client.submit([o for n in names for o in ops(Op.DELETE, ns, n)])
                done = client.wait([j.id for j in jobs], timeout=60)
                failed = [(j.id, j.vm, j.state.value, j.error) for j in done if j.state is not JobState.SUCCEEDED]
                if failed and host.worker:
                    failed.append(host.worker.log_tail(40))
            host.stop()
            # say why the cleanup failed (the QEMU check after this would only say that it did)
            assert not failed, failed


def running(client: RedisClient, job: Job) -> None:
    wait_until(lambda: client.job(job.id).state is JobState.RUNNING, timeout=30, what=f"job {job.id} running")


def launch(client: RedisClient, name: str, host: str) -> None:
    [job] = client.submit(ops(Op.LAUNCH, client.settings.namespace, name, memory_mib=64, host=host))
    done = client.wait([job.id], timeout=60)[0]
    assert done.state is JobState.SUCCEEDED, done.error


def no_vm_lock(redis: Redis, ns: str, vm: str) -> bool:
    return not redis.exists(keys.lock_key(vm_lock(ns, vm).name))


def test_cancel_a_running_job_stops_it_at_its_next_step(base_settings: Settings, client: RedisClient,
                                                        redis: Redis) -> None:
    ns = client.settings.namespace
    with qemu_host(base_settings, "qc", client):
        launch(client, "cv", "qc")
        [stop] = client.submit(ops(Op.STOP, ns, "cv", timeout_s=60))  # a guest with no OS never shuts down
        running(client, stop)
        asked = time.monotonic()
        assert client.cancel(stop.id).state is JobState.RUNNING  # asked, not yet stopped
        [done] = client.wait([stop.id], timeout=30)
        assert done.state is JobState.CANCELED and done.error is not None and "while running" in done.error.message
        assert time.monotonic() - asked < 3
        wait_until(lambda: no_vm_lock(redis, ns, "cv"), what="the VM lock to be free")
        assert client.vm(ns, "cv").state is VmState.RUNNING  # it stopped before forcing anything
        [pause] = client.submit(ops(Op.PAUSE, ns, "cv"))
        assert client.wait([pause.id])[0].state is JobState.SUCCEEDED


def test_soft_time_limit_fails_the_job_and_frees_its_lock(base_settings: Settings, client: RedisClient,
                                                          redis: Redis) -> None:
    ns = client.settings.namespace
    with qemu_host(base_settings, "qs", client) as host:
        launch(client, "sv", "qs")  # under the default limits: a first launch probes QEMU for seconds
        host.stop()
        host.env["VMORCH_JOB_SOFT_TIME_LIMIT"] = "1.5"
        host.start()
        [stop] = client.submit(ops(Op.STOP, ns, "sv", timeout_s=60))
        [done] = client.wait([stop.id], timeout=30)
        assert done.state is JobState.FAILED and done.error is not None
        assert done.error.code == "timeout" and "soft time limit" in done.error.message
        wait_until(lambda: no_vm_lock(redis, ns, "sv"), what="the VM lock to be free")


def test_hard_time_limit_on_a_wedged_hypervisor(base_settings: Settings, client: RedisClient, redis: Redis) -> None:
    """QEMU frozen: libvirt's call never returns. The job fails, the worker exits, a new one frees the lock."""
    ns = client.settings.namespace
    with qemu_host(base_settings, "qh", client) as host:
        launch(client, "hv", "qh")
        host.stop()
        host.env["VMORCH_JOB_HARD_TIME_LIMIT"] = "3"
        host.start()
        [qemu] = qemu_pids(host.root)
        os.kill(qemu, signal.SIGSTOP)
        try:
            [pause] = client.submit(ops(Op.PAUSE, ns, "hv"))
            [done] = client.wait([pause.id], timeout=30)
            assert done.state is JobState.FAILED and done.error is not None
            assert done.error.code == "timeout" and "hard time limit" in done.error.message
            assert host.worker is not None
            assert host.worker.proc.wait(timeout=10) == 75  # it took itself down
        finally:
            os.kill(qemu, signal.SIGCONT)
        host.start()  # what the supervisor does
        wait_until(lambda: no_vm_lock(redis, ns, "hv"), timeout=5, what="the dead worker's lock to be freed")
        [resume] = client.submit(ops(Op.KILL, ns, "hv"))
        assert client.wait([resume.id], timeout=30)[0].state is JobState.SUCCEEDED


def test_a_sigkilled_worker_s_job_is_rerun_and_changes_the_vm_once(base_settings: Settings, tmp_path: Path) -> None:
    # Its own Redis: under load a restart can outlast the session's 4 s host-down deadline, and that
    # case (the janitor fails the job) is the SIGSTOP test's, not this one's.
    with own_redis(base_settings, tmp_path) as (settings, client, redis):
        _sigkilled_worker_s_job_is_rerun(settings, client)
        assert_keyspace_clean(redis, settings.namespace)


def _sigkilled_worker_s_job_is_rerun(settings: Settings, client: RedisClient) -> None:
    ns = settings.namespace
    with qemu_host(settings, "qk", client) as host:
        launch(client, "kv", "qk")
        [stop] = client.submit(ops(Op.STOP, ns, "kv", timeout_s=3, force_after_timeout=True))
        running(client, stop)
        assert host.worker is not None
        host.worker.proc.send_signal(signal.SIGKILL)
        host.worker.proc.wait()
        killed = time.monotonic()
        assert client.job(stop.id).state is JobState.RUNNING  # mid-operation, as the OOM killer leaves it
        host.start()
        [done] = client.wait([stop.id], timeout=60)
        recovered = time.monotonic() - killed
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2, "the job should have been re-run once"
        assert client.vm(ns, "kv").state is VmState.SHUTOFF
        history = [e for e in client.events(ns, job_id=stop.id) if e.state == "running" and "attempt" in e.detail]
        assert [e.detail.split(",")[0] for e in history] == ["attempt 1", "attempt 2"]
        print(f"SIGKILL -> redelivered job final: {recovered:.2f}s")


def test_a_sigstopped_worker_loses_its_lock_and_touches_nothing_after(
        cluster: list[WorkerProc], base_settings: Settings, client: RedisClient, redis: Redis) -> None:
    """Frozen past its lock's expiry and the host deadline: the janitor takes over and fails the job;
    the resumed worker finds its lock lost before its next libvirt call."""
    ns = client.settings.namespace
    with qemu_host(base_settings, "qp", client) as host:
        launch(client, "pv", "qp")
        [stop] = client.submit(ops(Op.STOP, ns, "pv", timeout_s=40, force_after_timeout=True))
        running(client, stop)
        assert host.worker is not None
        host.worker.proc.send_signal(signal.SIGSTOP)
        try:
            [done] = client.wait([stop.id], timeout=60)
            assert done.state is JobState.FAILED and done.error is not None and done.error.code == "host_down"
        finally:
            host.worker.proc.send_signal(signal.SIGCONT)
        wait_hosts_up(base_settings, host.worker)
        worker = host.worker
        # the resumed worker's next step finds its lock gone, and it says so
        wait_until(lambda: any(s in worker.log_tail(200) for s in ("lost lock", "may have expired")),
                   timeout=15, what="the resumed worker to notice its lock is lost")
        assert client.job(stop.id).state is JobState.FAILED  # its late write was not allowed to land
        assert client.vm(ns, "pv").state is VmState.RUNNING  # it never forced the VM off
        assert qemu_pids(host.root), "the resumed worker touched libvirt again"
        wait_until(lambda: no_vm_lock(redis, ns, "pv"), what="the VM lock to be free")


def test_an_injected_renewal_failure_aborts_and_the_job_is_rerun(base_settings: Settings, client: RedisClient,
                                                                 redis: Redis) -> None:
    ns = client.settings.namespace
    with qemu_host(base_settings, "qr", client):
        launch(client, "rv", "qr")
        [stop] = client.submit(ops(Op.STOP, ns, "rv", timeout_s=4, force_after_timeout=True))
        running(client, stop)
        redis.delete(keys.lock_key(vm_lock(ns, "rv").name))  # the lock vanishes under its holder
        [done] = client.wait([stop.id], timeout=60)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2
        assert client.vm(ns, "rv").state is VmState.SHUTOFF


def test_a_job_the_worker_cannot_handle_fails_and_the_vms_next_job_still_runs(
        cluster: list[WorkerProc], client: RedisClient, redis: Redis) -> None:
    """A VM record the worker can't read (here: damaged by hand) fails the job with an internal
    error instead of leaving it queued forever; once the record is repaired the VM works again."""
    ns = client.settings.namespace
    [launch] = client.wait([j.id for j in client.submit(ops(Op.LAUNCH, ns, "broken", memory_mib=32))], timeout=30)
    assert launch.state is JobState.SUCCEEDED
    redis.hset(keys.vm(ns, "broken"), "memory_mib", "lots")
    [pause] = client.wait([j.id for j in client.submit(ops(Op.PAUSE, ns, "broken"))], timeout=30)
    assert pause.state is JobState.FAILED and pause.error is not None, pause
    assert pause.error.message.startswith("internal error: ValidationError"), pause.error
    assert pause.error.hint == "see the worker's log"
    redis.hset(keys.vm(ns, "broken"), "memory_mib", "32")
    [again] = client.wait([j.id for j in client.submit(ops(Op.PAUSE, ns, "broken"))], timeout=30)
    assert again.state is JobState.SUCCEEDED, again.error
    client.wait([j.id for j in client.submit(ops(Op.DELETE, ns, "broken"))], timeout=30)


def _signal_pending(pid: int, sig: signal.Signals) -> bool:
    """Whether ``sig`` is pending for the process (it is stopped, so it can't act on it yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    bit = 1 << (int(sig) - 1)
    return any(int(line.split()[1], 16) & bit for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:")))


@contextmanager
def own_redis(base_settings: Settings, tmp: Path) -> Iterator[tuple[Settings, RedisClient, Redis]]:
    """A Redis of the test's own: no janitor of the session's hosts (their host-down deadline is 4 s)
    fails its jobs while its one worker restarts."""
    with private_redis(tmp / "redis") as server:
        (tmp / "home").mkdir()
        settings = base_settings.model_copy(update={"redis_url": server.url, "home": tmp / "home",
                                                    "namespace": "own"})
        redis = Redis.from_url(server.url, decode_responses=True, socket_timeout=None)
        try:
            yield settings, RedisClient(settings), redis
        finally:
            redis.close()


def test_a_kill_interrupted_by_a_worker_crash_records_shutoff(base_settings: Settings, tmp_path: Path) -> None:
    """The worker is SIGKILLed inside libvirt's destroy. QEMU ends while no worker runs, so the restarted
    worker's libvirt finds it gone ("shut off, reason crashed"). The re-run kill finds the VM off and
    records what a kill promises: shutoff, not libvirt's reason."""
    with own_redis(base_settings, tmp_path) as (settings, client, redis):
        _kill_interrupted_by_a_crash(settings, client)
        assert_keyspace_clean(redis, settings.namespace)


def _kill_interrupted_by_a_crash(settings: Settings, client: RedisClient) -> None:
    ns = settings.namespace
    # No periodic drift pass: it takes libvirt's "shut off, reason crashed" for news and would record
    # "crashed" over the kill's "shutoff" (worker/reconcile.py's drift(); its owner was told).
    with qemu_host(settings, "qx", client, drift_sync_interval="0") as host:
        launch(client, "xv", "qx")
        [qemu] = qemu_pids(host.root)
        # A stopped QEMU can't act on libvirt's SIGTERM: the destroy waits for it (SIGKILL only after 10 s).
        os.kill(qemu, signal.SIGSTOP)
        try:
            [kill] = client.submit(ops(Op.KILL, ns, "xv"))
            running(client, kill)
            wait_until(lambda: _signal_pending(qemu, signal.SIGTERM), timeout=8,
                       what="libvirt's destroy to send QEMU its SIGTERM")
            assert host.worker is not None
            host.worker.proc.send_signal(signal.SIGKILL)  # mid-destroy
            host.worker.proc.wait()
        finally:
            os.kill(qemu, signal.SIGCONT)  # the pending SIGTERM ends it, with no worker left to see it
        wait_until(lambda: qemu not in qemu_pids(host.root), timeout=15, what="QEMU to exit")
        assert client.job(kill.id).state is JobState.RUNNING
        host.start()
        [done] = client.wait([kill.id], timeout=60)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2, "the kill should have been re-run once"
        assert done.result is not None and done.result["state"] == "shutoff", done.result
        assert client.vm(ns, "xv").state is VmState.SHUTOFF
        assert not qemu_pids(host.root)
