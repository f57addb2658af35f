"""What happens to vmorch's VMs behind its back shows in ``vm show`` within seconds (worker.sync).

Real QEMU: a QEMU process killed under a running worker (libvirt's lifecycle event), and a
real libvirtd whose domains a second connection destroys, undefines, resizes and snapshots
while the worker runs (events, and the periodic pass for what no event tells).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from orchestrator.model.operation import Op
from orchestrator.model.records import Event, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import WorkerProc, ops, start_worker, wait_hosts_up, wait_until
from .helpers import private_libvirtd, qemu_pids, qemu_worker
from .test_doctor import check, doctor
from .test_operations import ok, state

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

#: how long vmorch may take to see a change made behind its back (the contract: a few seconds)
SEEN_WITHIN_S = 10.0


def corrections(client: RedisClient, vm: str, *by: str) -> list[Event]:
    """The VM's history entries written by ``by`` (who made a correction: "libvirt@HOST" for an event,
    "sync@HOST" for the periodic pass), oldest first."""
    return [e for e in client.events(client.settings.namespace, vm=vm) if e.kind == "vm" and e.by in by]


def seen(client: RedisClient, vm: str, predicate: object, what: str, since: float | None = None) -> float:
    """Seconds from ``since`` (the outside change, default now) until the VM's record satisfies ``predicate``."""
    started = time.monotonic() if since is None else since
    wait_until(lambda: predicate(client.vm(client.settings.namespace, vm)),  # type: ignore[operator]
               timeout=SEEN_WITHIN_S, interval=0.02, what=what)
    elapsed = time.monotonic() - started
    print(f"\n{what}: seen after {elapsed:.3f}s")
    assert elapsed < SEEN_WITHIN_S, what
    return elapsed


@pytest.fixture(scope="module")
def qemu_host(base_settings: Settings) -> Iterator[WorkerProc]:
    """An embedded-QEMU worker whose periodic pass is off: what it sees, it sees through events."""
    root = Path(tempfile.mkdtemp(prefix="dq", dir="/tmp"))  # short: QEMU's socket paths under it must fit
    with qemu_worker(base_settings, "dq1", root, env={"VMORCH_DRIFT_SYNC_INTERVAL": "0"}) as worker:
        yield worker


def test_a_killed_qemu_process_shows_within_seconds(qemu_host: WorkerProc, client: RedisClient) -> None:
    ns = client.settings.namespace
    root = Path(qemu_host.libvirt_uri.split("root=", 1)[1])
    ok(client, Op.LAUNCH, "victim", memory_mib=64, host="dq1")
    pidfile = root / "run" / "qemu" / f"{ns}.victim.pid"
    pid = int(pidfile.read_text().strip())
    assert pid in qemu_pids(root)  # the QEMU this test started through vmorch, and no other
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    seen(client, "victim", lambda vm: vm.state in (VmState.SHUTOFF, VmState.CRASHED), "a killed QEMU", killed)
    [fix] = corrections(client, "victim", "libvirt@dq1")
    assert fix.state in ("shutoff", "crashed") and "was running, now" in fix.detail, fix
    assert "its QEMU process died" in (client.vm(ns, "victim").note or "")
    wait_until(lambda: not qemu_pids(root), what="the killed QEMU to be gone")
    ok(client, Op.START, "victim")  # the record tells the truth: the VM starts again
    assert state(client, "victim") is VmState.RUNNING
    assert corrections(client, "victim", "libvirt@dq1") == [fix]  # vmorch's own start is no drift
    ok(client, Op.DELETE, "victim")


# -- a real libvirtd, changed through a second connection while the worker runs -----------------

@pytest.fixture
def libvirtd() -> Iterator[str]:
    """A real libvirtd of this test's own that runs QEMU (private mount namespace, own socket, no virtlogd)."""
    with private_libvirtd("vmq", qemu_conf='stdio_handler = "file"\n') as (uri, _):
        yield uri


@pytest.mark.slow
def test_changes_through_another_libvirt_connection_are_corrected(
        base_settings: Settings, client: RedisClient, libvirtd: str, settings: Settings) -> None:
    uri = libvirtd
    ns = client.settings.namespace
    worker = start_worker(base_settings, "dl1", uri, concurrency=2, env={"VMORCH_DRIFT_SYNC_INTERVAL": "1"})
    other = libvirt.open(uri)  # what an operator's virsh is
    try:
        wait_hosts_up(base_settings, worker, timeout=60)
        for name in ("d1", "d2", "d3"):
            ok(client, Op.LAUNCH, name, memory_mib=64, host="dl1")

        changed = time.monotonic()
        other.lookupByName(f"{ns}.d1").destroy()
        seen(client, "d1", lambda vm: vm.state is VmState.SHUTOFF, "a domain destroyed with another connection",
             changed)
        # The event, or the periodic pass if it came first (it may have waited on libvirt during the destroy).
        [fix] = corrections(client, "d1", "libvirt@dl1", "sync@dl1")
        assert "was running, now shutoff (destroyed outside vmorch)" in fix.detail, fix

        d2 = other.lookupByName(f"{ns}.d2")
        d2.destroy()
        changed = time.monotonic()
        d2.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        seen(client, "d2", lambda vm: vm.state is VmState.MISSING, "a domain undefined with another connection",
             changed)
        fixes = corrections(client, "d2", "libvirt@dl1", "sync@dl1")
        assert any("now missing (undefined outside vmorch)" in e.detail for e in fixes), fixes
        _, report, text = doctor(settings)
        vms = check(report, "vms")
        assert vms["status"] == "warn" and f"{ns}/d2 (on dl1)" in vms["message"], text
        assert "vm delete" in vms["fix"]

        d3 = other.lookupByName(f"{ns}.d3")  # the periodic pass sees these (or a "defined" event, if any)
        changed = time.monotonic()
        d3.setMemoryFlags(48 * 1024, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        d3.snapshotCreateXML("<domainsnapshot><name>outside</name></domainsnapshot>", 0)
        seen(client, "d3", lambda vm: (vm.memory_mib, vm.snapshots) == (48, ["outside"]),
             "memory and a snapshot changed with another connection", changed)
        said = " ".join(e.detail for e in corrections(client, "d3", "libvirt@dl1", "sync@dl1"))
        assert "memory 64 -> 48 MiB" in said and "snapshots +outside" in said, said
        # A live snapshot pauses the domain for a moment; vmorch may have seen that, and then the resume.
        seen(client, "d3", lambda vm: vm.state is VmState.RUNNING, "d3 running again after the snapshot")

        for name in ("d1", "d2", "d3"):  # a missing VM's delete forgets it
            ok(client, Op.DELETE, name)
        assert client.vms(ns) == []
        assert other.listAllDomains(0) == []  # no domain left behind
        _, report, _ = doctor(settings)
        assert check(report, "vms")["status"] == "ok"
    finally:
        if client.vms(ns):  # only when an assertion above failed: delete through vmorch while its worker runs
            client.wait([j.id for j in client.submit(ops(Op.DELETE, ns, ",".join(v.name for v in client.vms(ns))))])
        for dom in other.listAllDomains(0):
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        other.close()
        worker.stop()
