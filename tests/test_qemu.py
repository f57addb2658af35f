"""Real QEMU through libvirt's embedded driver, driven through the queue by a real worker."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.operation import Op
from orchestrator.model.records import JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import WorkerProc, ops, wait_until
from .helpers import qemu_pids, qemu_worker
from .test_operations import ok, one, state
from .test_ordering import assert_serialized_in_order, submit_together

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]


@pytest.fixture(scope="module")
def qemu_host(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    with qemu_worker(base_settings, "q1", tmp_path_factory.mktemp("qemu-root"), remove_root=False) as worker:
        yield worker


def test_real_vm_lifecycle(qemu_host: WorkerProc, client: RedisClient) -> None:
    root = qemu_host.libvirt_uri.split("root=", 1)[1]
    launch = ok(client, Op.LAUNCH, "real", memory_mib=64, host="q1")
    assert launch.result is not None and launch.result["state"] == "running"
    wait_until(lambda: len(qemu_pids(Path(root))) == 1, what="one QEMU process")
    ok(client, Op.PAUSE, "real")
    assert state(client, "real") is VmState.PAUSED
    ok(client, Op.RESUME, "real")
    ok(client, Op.SNAPSHOT, "real", name="s1")
    vm = client.vm(client.settings.namespace, "real")
    assert vm.snapshots == ["s1"]
    # its size, measured in the VM's qcow2: the running guest's saved state
    [detail] = vm.snapshot_details
    assert detail.name == "s1" and detail.size_bytes is not None and detail.size_bytes > 0, detail
    ok(client, Op.PAUSE, "real")
    ok(client, Op.REVERT, "real", name="s1")
    assert state(client, "real") is VmState.RUNNING
    ok(client, Op.KILL, "real")
    assert state(client, "real") is VmState.SHUTOFF
    wait_until(lambda: not qemu_pids(Path(root)), what="QEMU to exit after kill")
    refused = one(client, Op.RESUME, "real")
    assert refused.state is JobState.FAILED and refused.error is not None and "shut off" in refused.error.message
    ok(client, Op.DELETE, "real")
    assert client.vms(client.settings.namespace) == []


def test_seed_scenario_on_real_qemu(qemu_host: WorkerProc, client: RedisClient, settings: Settings,
                                    redis: Redis) -> None:
    ok(client, Op.LAUNCH, "seedq", memory_mib=64, host="q1")
    for _ in range(3):
        first, second = submit_together(settings, redis, ["vm", "set", "seedq", "--memory", "48"],
                                        ["vm", "kill", "seedq"])
        done = client.wait([first.id, second.id], timeout=60)
        assert all(j.state is JobState.SUCCEEDED for j in done), [j.error for j in done]
        assert_serialized_in_order(done)
        vm = client.vm(settings.namespace, "seedq")
        assert (vm.state, vm.memory_mib) == (VmState.SHUTOFF, 48)
        ok(client, Op.START, "seedq")
    stopped = one(client, Op.STOP, "seedq", timeout_s=1)
    # a guest with no OS ignores ACPI: a graceful stop times out and says how to force it
    assert stopped.state is JobState.FAILED and stopped.error is not None and "--force" in (stopped.error.hint or "")
    ok(client, Op.STOP, "seedq", timeout_s=1, force=True)
    assert state(client, "seedq") is VmState.SHUTOFF
    launches = client.submit(ops(Op.LAUNCH, settings.namespace, "multi[1-3]", memory_mib=64, host="q1"))
    assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in launches], timeout=120))


def test_the_host_reserves_the_larger_of_set_and_live(qemu_host: WorkerProc, client: RedisClient) -> None:
    """A real guest that keeps more than is set (no balloon driver; no vCPU unplug without the guest's
    help): the host's reservation is what it really has, until it is off."""
    def committed() -> tuple[int, int]:
        [h] = [h for h in client.hosts() if h.name == "q1"]
        return h.committed_mib, h.committed_vcpus

    base = committed()
    ok(client, Op.LAUNCH, "rsv", memory_mib=64, vcpus=1, host="q1")
    ok(client, Op.SET, "rsv", vcpus=2)  # hot-plugged: live and set agree
    ok(client, Op.SET, "rsv", memory_mib=48, vcpus=1)  # the guest keeps 64 MiB and 2 vCPUs
    vm = client.vm(client.settings.namespace, "rsv")
    assert (vm.memory_mib, vm.memory_mib_live, vm.vcpus, vm.vcpus_live) == (48, 64, 1, 2), vm
    assert committed() == (base[0] + 64, base[1] + 2)
    ok(client, Op.SET, "rsv", memory_mib=96)  # above what QEMU started with: for the next boot
    assert committed() == (base[0] + 96, base[1] + 2)
    ok(client, Op.KILL, "rsv")  # off: only what is set stays reserved
    assert committed() == (base[0] + 96, base[1] + 1)
    ok(client, Op.DELETE, "rsv")
    assert committed() == base
