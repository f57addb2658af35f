"""Reconciliation at worker start: the registry takes libvirt's word for its host's VMs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from orchestrator.model.operation import Op
from orchestrator.model.records import JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import ops, start_worker, wait_hosts_up


def test_a_restarted_worker_repairs_the_registry(base_settings: Settings, client: RedisClient) -> None:
    ns = client.settings.namespace
    first = start_worker(base_settings, "rc1")
    try:
        wait_hosts_up(base_settings, first)
        jobs = client.submit(ops(Op.LAUNCH, ns, "rc[1-2]", memory_mib=32, host="rc1"))
        assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in jobs]))
    finally:
        first.stop()
    assert {v.state for v in client.vms(ns)} == {VmState.UNKNOWN}  # the host is down: vmorch can't know
    # test:///default keeps its domains in the worker process: they died with it, behind vmorch's back.
    second = start_worker(base_settings, "rc1")
    try:
        wait_hosts_up(base_settings, second)
        vms = client.vms(ns)
        assert [(v.name, v.state) for v in vms] == [("rc1", VmState.MISSING), ("rc2", VmState.MISSING)]
        assert all(v.note and "reconciled" in v.note and "was running" in v.note for v in vms)
        deletes = client.submit(ops(Op.DELETE, ns, "rc[1-2]"))  # deleting a missing VM cleans the registry
        assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in deletes]))
        assert client.vms(ns) == []
    finally:
        second.stop()


# -- real QEMU: what was done to the domains while the worker was away ---------------------------

#: an operator's virsh on the embedded root, as its own process (one process per root at a time)
_OUTSIDE = """
import contextlib, sys, threading, libvirt
libvirt.virEventRegisterDefaultImpl()
threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True).start()
conn = libvirt.open(sys.argv[1])
gone, resized = conn.lookupByName(sys.argv[2]), conn.lookupByName(sys.argv[3])
for dom in (gone, resized):
    with contextlib.suppress(libvirt.libvirtError):  # the driver may be stopping it as we look
        dom.destroy()
gone.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
resized.setMemoryFlags(48 * 1024, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
resized.snapshotCreateXML("<domainsnapshot><name>outside</name></domainsnapshot>", 0)
conn.close()
"""


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_a_restarted_worker_takes_state_memory_and_snapshots_from_libvirt(
        base_settings: Settings, client: RedisClient) -> None:
    from .test_qemu import qemu_pids

    ns = client.settings.namespace
    root = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))  # short: QEMU's socket paths under it must fit
    uri = f"qemu:///embed?root={root}"
    first = start_worker(base_settings, "rq1", uri, concurrency=2)
    try:
        wait_hosts_up(base_settings, first, timeout=60)
        jobs = client.submit(ops(Op.LAUNCH, ns, "rq[1-2]", memory_mib=64, host="rq1"))
        launched = client.wait([j.id for j in jobs], timeout=120)
        assert all(j.state is JobState.SUCCEEDED for j in launched), [j.error for j in launched]
    finally:
        first.stop()
    # The embedded driver stopped the domains with the worker; another process undefines one, resizes
    # and snapshots the other.
    done = subprocess.run([sys.executable, "-c", _OUTSIDE, uri, f"{ns}.rq1", f"{ns}.rq2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    second = start_worker(base_settings, "rq1", uri, concurrency=2)
    try:
        wait_hosts_up(base_settings, second, timeout=60)
        gone, resized = client.vms(ns)
        assert gone.state is VmState.MISSING
        assert gone.note == "reconciled at worker start: was running, now missing (undefined outside vmorch)"
        assert (resized.state, resized.memory_mib, resized.snapshots) == (VmState.SHUTOFF, 48, ["outside"])
        assert resized.note and "was running, now shutoff (stopped" in resized.note
        assert "memory 64 -> 48 MiB; snapshots +outside" in resized.note
        by = {e.by for e in client.events(ns, vm="rq2") if e.kind == "vm"}
        assert f"reconcile@rq1:{second.proc.pid}" in by
    finally:
        deletes = client.submit(ops(Op.DELETE, ns, "rq[1-2]"))  # while the worker runs, even after a failure
        assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in deletes], timeout=60))
        assert client.vms(ns) == []
        second.stop()
        leftover = qemu_pids(root)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"QEMU processes outlived the test: {leftover}"


def test_a_vm_recorded_off_that_libvirt_calls_crashed_is_no_drift_but_a_running_one_is() -> None:
    """A kill re-run after its worker died finds the domain "shut off, reason crashed" and records
    shutoff, the state it promised: the periodic pass must not turn that into crashed."""
    from orchestrator.model.records import Vm
    from worker.libvirtconn import DomainStatus
    from worker.reconcile import drift

    def vm(state: VmState) -> Vm:
        return Vm(name="v", namespace="n", host="h", state=state, memory_mib=64, vcpus=1, tags={}, domain="n.v")

    crashed = DomainStatus("n.v", VmState.CRASHED, 64, 1, [], {})
    assert drift(vm(VmState.SHUTOFF), crashed) == {}
    assert drift(vm(VmState.RUNNING), crashed) == {"state": "crashed"}
