"""The libvirt driver against libvirt's test hypervisor and against real QEMU (embedded driver).

No mocks: ``test:///default`` runs in-process; ``qemu:///embed`` starts real (software
emulated, OS-less) QEMU guests, whose processes outlive Python, so teardown destroys them
and checks that none is left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
import pytest

from orchestrator.model.errors import (
    AlreadyExists,
    Canceled,
    HypervisorError,
    InvalidInput,
    InvalidState,
    NotFound,
    OperationTimeout,
    VmGone,
)
from orchestrator.model.records import VmState
from worker import domxml
from worker.disks import qcow2_snapshot_sizes, qemu_img
from worker.driver import DomainSpec, Driver
from worker.eventloop import ensure_event_loop
from worker.presses import Pressed, press_until
from worker.results import Launched

HOSTILE = "<&\"']]></vmorch:tag><vmorch:fence>999</vmorch:fence>"
HAVE_QEMU_IMG = shutil.which("qemu-img") is not None


def _noop() -> None:
    pass


@pytest.fixture
def vmns() -> str:
    """A namespace of this test's own: test:///default is shared by every connection of the process."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def drv(tmp_path: Path, vmns: str) -> Iterator[Driver]:
    driver = Driver("test:///default", tmp_path / "disks")
    yield driver
    for status in driver.list_domains():
        if status.domain.startswith(f"{vmns}."):
            driver.delete(status.domain)
    driver.close()


def spec(ns: str, vm: str = "vm1", **kw: object) -> DomainSpec:
    return DomainSpec(namespace=ns, vm=vm, **{"memory_mib": 64, "vcpus": 1, **kw})  # type: ignore[arg-type]


# -- test:///default --------------------------------------------------------------------


def test_event_loop_is_started_once() -> None:
    ensure_event_loop()
    ensure_event_loop()
    assert [t.name for t in threading.enumerate()].count("libvirt-events") == 1


def test_launch_status_and_redelivered_launch(drv: Driver, vmns: str, tmp_path: Path) -> None:
    s = spec(vmns, tags={"role": "db", "evil": HOSTILE}, job_id=11, fence=4, memory_mib=96, vcpus=2)
    result = drv.launch(s)
    assert (result.state, result.changed) == (VmState.RUNNING, True)

    status = drv.status(s.domain)
    assert (status.state, status.memory_mib, status.vcpus, status.snapshots) == (VmState.RUNNING, 96, 2, [])
    disk = str(drv.disk_path(s.domain))  # in the VM-disk store, under a name not made from the VM's
    assert disk.startswith(str(tmp_path / "disks" / "vms")) and "vm1" not in Path(disk).name
    assert status.metadata == {
        "namespace": vmns, "vm": "vm1", "tags": {"role": "db", "evil": HOSTILE}, "job_id": 11, "fence": 4, "disk": disk,
    }  # fmt: skip
    if HAVE_QEMU_IMG:
        assert Path(disk).is_file()

    # the job's result, as users see it: the same JSON as when the driver returned dicts
    assert result.to_json() == {"state": "running", "changed": True, "domain": s.domain, "disk": disk}

    again = drv.launch(s)  # the same job, redelivered after a worker crash
    assert again == Launched(VmState.RUNNING, False, "already launched", domain=s.domain, disk=disk)
    drv.kill(s.domain)
    again = drv.launch(s)
    assert (again.state, again.changed) == ("running", True)


def test_launch_over_a_foreign_domain_is_refused(drv: Driver, vmns: str) -> None:
    foreign = domxml.domain_xml(
        name=f"{vmns}.vm1", virt_type="test", memory_mib=64, vcpus=1, disk=None, meta=domxml.VmorchMeta(vmns, "other")
    )
    drv.conn.defineXML(foreign)
    with pytest.raises(AlreadyExists, match="vmorch did not create it"):
        drv.launch(spec(vmns))


def test_list_domains_ignores_the_builtin_test_domain(drv: Driver, vmns: str) -> None:
    drv.launch(spec(vmns, "a"))
    drv.launch(spec(vmns, "b", disk_gib=0))
    names = [s.domain for s in drv.list_domains()]
    assert "test" not in names
    assert {f"{vmns}.a", f"{vmns}.b"} <= set(names)
    assert drv.status("test").metadata == {}  # libvirt has it; it simply isn't vmorch's


def test_start_pause_resume_are_idempotent_and_conflicts_are_named(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns))
    assert drv.start(d).to_json() == {"state": "running", "changed": False, "note": "already running"}
    assert drv.resume(d).note == "already running"
    assert drv.pause(d).to_json() == {"state": "paused", "changed": True}
    assert drv.pause(d).to_json() == {"state": "paused", "changed": False, "note": "already paused"}
    with pytest.raises(InvalidState, match="it is paused; use resume"):
        drv.start(d)
    with pytest.raises(InvalidState, match=r"cannot reboot .*: it is paused"):
        drv.reboot(d)
    assert drv.resume(d).to_json() == {"state": "running", "changed": True}
    assert drv.reboot(d).state == "running"

    assert drv.kill(d).to_json() == {"state": "shutoff", "changed": True}
    assert drv.kill(d).changed is False
    for op, verb in [(drv.pause, "pause"), (drv.resume, "resume"), (drv.reboot, "reboot")]:
        with pytest.raises(InvalidState) as err:
            op(d)
        assert err.value.message == f"cannot {verb} {d}: it is shut off"
    assert drv.start(d).to_json() == {"state": "running", "changed": True}


def test_missing_domain(drv: Driver, vmns: str) -> None:
    d = f"{vmns}.ghost"
    assert drv.status(d).state == VmState.MISSING
    for op in (drv.start, drv.pause, drv.resume, drv.reboot):
        with pytest.raises(VmGone):
            op(d)
    with pytest.raises(VmGone):
        drv.stop(d, timeout_s=1, force=True, check=_noop)
    with pytest.raises(VmGone):
        drv.set_metadata(d, tags={})
    assert drv.kill(d).to_json() == {"state": "missing", "changed": False, "note": "no such domain"}
    assert drv.delete(d).changed is False


def test_delete_is_idempotent_and_removes_the_disk(drv: Driver, vmns: str, tmp_path: Path) -> None:
    s = spec(vmns)
    drv.launch(s)
    drv.snapshot(s.domain, "s1", job_id=1)
    disk = drv.disk_path(s.domain)
    result = drv.delete(s.domain)
    assert (result.state, result.changed) == ("missing", True)
    assert not disk.exists()
    assert drv.status(s.domain).state == VmState.MISSING
    gone = drv.delete(s.domain)
    assert gone.to_json() == {"state": "missing", "changed": False, "disks_removed": [], "note": "no such domain"}

    disk.write_bytes(b"left over by a crash between delete's undefine and unlink")
    assert drv.delete(s.domain).disks_removed == (str(disk),)


def test_stop(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns))
    calls: list[float] = []
    started = time.monotonic()
    result = drv.stop(d, timeout_s=60, force=True, check=lambda: calls.append(time.monotonic()))
    assert result.to_json() == {"state": "shutoff", "changed": True, "note": "forced off"}
    assert time.monotonic() - started < 1, "--force must not wait out --timeout"
    assert calls, "check() must come before the power-off"
    assert drv.stop(d, timeout_s=5, force=False, check=_noop).changed is False

    drv.start(d)  # the test driver's guest obeys the first request
    result = drv.stop(d, timeout_s=5, force=False, check=lambda: calls.append(time.monotonic()))
    assert (result.state, result.changed) == ("shutoff", True) and "(1 sent)" in result.note
    drv.start(d)
    assert drv.stop(d, timeout_s=0, force=False, check=_noop).state == "shutoff"  # 0: one request, one look

    drv.start(d)

    def cancel() -> None:
        raise Canceled("job canceled")

    with pytest.raises(Canceled):
        drv.stop(d, timeout_s=5, force=True, check=cancel)
    with pytest.raises(Canceled):
        drv.stop(d, timeout_s=5, force=False, check=cancel)
    assert drv.status(d).state == "running"

    drv.pause(d)
    with pytest.raises(InvalidState, match="gracefully: it is paused"):
        drv.stop(d, timeout_s=1, force=False, check=_noop)
    assert drv.stop(d, timeout_s=1, force=False, force_after_timeout=True, check=_noop).note == \
        "forced off: it was paused"
    drv.start(d)
    drv.pause(d)
    assert drv.stop(d, timeout_s=1, force=True, check=_noop).to_json() == \
        {"state": "shutoff", "changed": True, "note": "forced off: it was paused"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += max(seconds, 0.001)


def test_press_until_repeats_the_request_until_done_or_the_timeout() -> None:
    """The loop of stop and reboot: a request at once and every 3 s, a look every 0.2 s, checks before each."""
    clock = FakeClock()
    presses: list[float] = []
    checks: list[float] = []

    def run(timeout_s: float, done_after: float | None = None) -> Pressed:
        presses.clear()
        start = clock.now
        return press_until(lambda: presses.append(clock.now - start),
                           lambda: done_after is not None and clock.now - start >= done_after,
                           lambda: checks.append(clock.now), timeout_s=timeout_s, clock=clock, sleep=clock.sleep)

    never = run(10)
    assert (never.done, never.presses) == (False, 4) and never.seconds == pytest.approx(10, abs=0.01)
    assert presses == pytest.approx([0, 3, 6, 9], abs=0.01)
    assert len(checks) >= 10 / 0.2  # one before each look

    # a guest that reacts to the third press (the first two came while it booted)
    third = run(60, done_after=6.5)
    assert (third.done, third.presses) == (True, 3) and 6.5 <= third.seconds < 6.8
    assert presses == pytest.approx([0, 3, 6], abs=0.01)

    once = run(0)  # --timeout 0: one request, one look, no wait
    assert (once.done, once.presses, once.seconds) == (False, 1, 0)
    at_once = run(0, done_after=0)
    assert (at_once.done, at_once.presses) == (True, 1)

    def cancel() -> None:
        raise Canceled("job canceled")

    with pytest.raises(Canceled):
        press_until(lambda: presses.append(0), lambda: False, cancel, timeout_s=5, clock=clock, sleep=clock.sleep)


def test_reboot_on_the_test_driver(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns))
    assert drv.reboot(d, timeout_s=5, check=_noop).to_json() == \
        {"state": "running", "changed": True, "note": "rebooted (test driver)"}
    result = drv.reboot(d, force=True, check=_noop)
    assert (result.state, result.changed) == ("running", True) and result.note.startswith("reset")

    def cancel() -> None:
        raise Canceled("job canceled")

    with pytest.raises(Canceled):
        drv.reboot(d, force=True, check=cancel)


def test_set_resources_running(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns, memory_mib=128, vcpus=1))

    result = drv.set_resources(d, memory_mib=96, vcpus=None)  # below the live maximum: balloon
    assert result.to_json() == {"state": "running", "changed": True, "memory_mib": 96, "vcpus": 1, "live": True,
                                "memory_mib_live": 96, "vcpus_live": 1}

    # vCPUs: hot-plugged into the running VM, up to the maximum it was defined with (8)
    result = drv.set_resources(d, memory_mib=None, vcpus=2)
    assert (result.vcpus, result.live, result.note) == (2, True, "")
    assert drv.conn.lookupByName(d).vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2

    result = drv.set_resources(d, memory_mib=256, vcpus=12)
    assert (result.memory_mib, result.vcpus, result.live) == (256, 12, False)
    assert (result.memory_mib_live, result.vcpus_live) == (96, 2)  # read back: the running VM kept them
    assert "memory applies at the next boot" in result.note
    assert "vcpus applies at the next boot (the running VM's maximum is 8)" in result.note
    status = drv.status(d)
    assert (status.memory_mib, status.vcpus) == (256, 12)

    again = drv.set_resources(d, memory_mib=256, vcpus=12)  # redelivered: nothing more to change
    assert (again.changed, again.live, again.note) == (False, False, result.note)

    drv.kill(d)
    drv.start(d)
    assert drv.conn.lookupByName(d).info()[1:4:2] == [256 * 1024, 12]


def test_set_resources_shut_off(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns, memory_mib=128, vcpus=2))
    drv.kill(d)
    result = drv.set_resources(d, memory_mib=64, vcpus=1)
    assert result.to_json() == {"state": "shutoff", "changed": True, "memory_mib": 64, "vcpus": 1, "live": False,
                                "memory_mib_live": None, "vcpus_live": None}
    # memory: current and maximum both; vCPUs: the current count, the maximum keeps its hot-plug room
    assert domxml.parse_resources(drv.conn.lookupByName(d).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == (64, 64, 1, 8)
    result = drv.set_resources(d, memory_mib=512, vcpus=4)
    assert (result.memory_mib, result.vcpus, result.changed) == (512, 4, True)
    assert drv.set_resources(d, memory_mib=512, vcpus=None).changed is False


def test_snapshot_and_revert(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns, memory_mib=64))
    assert drv.snapshot(d, "s1", job_id=7).to_json() == {"state": "running", "changed": True, "snapshot": "s1"}
    assert drv.snapshot(d, "s1", job_id=7).changed is False  # redelivered
    with pytest.raises(AlreadyExists, match="already has a snapshot named 's1'"):
        drv.snapshot(d, "s1", job_id=8)
    with pytest.raises(NotFound, match="no snapshot named 'nope'"):
        drv.revert(d, "nope")

    drv.set_resources(d, memory_mib=128, vcpus=None)
    drv.set_metadata(d, tags={"after": "snapshot"}, fence=9)
    drv.kill(d)
    assert drv.status(d).snapshots == ["s1"]

    result = drv.revert(d, "s1")
    assert result.to_json() == {"state": "running", "changed": True, "snapshot": "s1", "memory_mib": 64, "vcpus": 1,
                                "memory_mib_live": None, "vcpus_live": None}  # the guest runs what is set
    # The VM goes back; vmorch's own bookkeeping (tags, fence) does not.
    meta = drv.status(d).metadata
    assert (meta["tags"], meta["fence"]) == ({"after": "snapshot"}, 9)


@pytest.mark.skipif(not HAVE_QEMU_IMG, reason="qemu-img is not installed")
def test_snapshot_sizes_are_read_from_the_qcow2_and_unknown_on_the_test_driver(drv: Driver, vmns: str,
                                                                               tmp_path: Path) -> None:
    # qemu-img alone: an internal snapshot of a disk no guest runs on saves no guest state
    alone = tmp_path / "alone.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(alone), "1M")
    qemu_img("snapshot", "-c", "cold", str(alone))
    assert qcow2_snapshot_sizes(alone) == {"cold": 0}
    # the test driver keeps snapshots as libvirt metadata only: the VM's disk is there but holds none
    s = spec(vmns, disk_gib=1)
    drv.launch(s)
    assert drv.disk_path(s.domain).is_file()
    drv.snapshot(s.domain, "s1", job_id=2)
    [detail] = drv.snapshot_details(s.domain)
    assert (detail["name"], detail["size_bytes"]) == ("s1", None) and detail["created_at"]


def test_tag_metadata_update_round_trips_through_libvirt(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns, tags={"a": "1"}, job_id=3))
    tags = {"evil": HOSTILE, "spaces": "  padded  ", "empty": "", "unicode": "naïve ✓"}
    drv.set_metadata(d, tags=tags)
    status = drv.status(d)
    assert status.metadata["tags"] == tags
    assert (status.metadata["fence"], status.metadata["job_id"]) == (0, 3)
    live = domxml.parse_metadata(drv.conn.lookupByName(d).XMLDesc(0))
    assert live is not None and live.tags == tags  # the running definition too

    drv.set_metadata(d, fence=12, job_id=4)
    assert drv.status(d).metadata == {**status.metadata, "fence": 12, "job_id": 4}

    drv.kill(d)
    drv.set_metadata(d, tags={})
    assert drv.status(d).metadata["tags"] == {}


def test_metadata_of_a_domain_vmorch_did_not_make_is_refused(drv: Driver, vmns: str) -> None:
    d = spec(vmns).domain
    drv.launch(spec(vmns))
    dom = drv.conn.lookupByName(d)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, domxml.NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    with pytest.raises(InvalidState, match="not managed by vmorch"):
        drv.set_metadata(d, fence=5)
    drv.kill(d)
    drv.delete(d)


def test_threads_share_one_driver(drv: Driver, vmns: str) -> None:
    names = [f"vm{i}" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: drv.launch(spec(vmns, n, disk_gib=0)), names))
        assert all(r.changed for r in results)
        list(pool.map(lambda n: drv.pause(f"{vmns}.{n}"), names))
    states = {s.domain: s.state for s in drv.list_domains() if s.domain.startswith(vmns)}
    assert states == {f"{vmns}.{n}": VmState.PAUSED for n in names}


# -- real QEMU through the embedded driver ----------------------------------------------

qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")


def _qemu_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def qdrv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    # One Driver for the module: libvirt allows one embedded root per process, ever.
    base = tmp_path_factory.mktemp("qemu")
    root = base / "root"
    driver = Driver(f"qemu:///embed?root={root}", base / "disks")
    assert (root / "etc" / "qemu.conf").is_file()
    try:
        yield driver
    finally:
        driver.destroy_all(vmorch_only=False)
        for status in driver.list_domains():
            driver.delete(status.domain)
        driver.close()
        deadline = time.monotonic() + 10
        while _qemu_pids(str(base)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _qemu_pids(str(base))
        for pid in left:  # don't leak guests into the machine even when the assertion fails
            os.kill(pid, 9)
        assert not left, f"QEMU processes left behind: {left}"


@qemu
@pytest.mark.qemu
def test_qemu_lifecycle(qdrv: Driver) -> None:
    s = DomainSpec(namespace="q", vm="life", memory_mib=64, vcpus=1, disk_gib=1, job_id=1)
    d = s.domain
    try:
        assert qdrv.launch(s).state == "running"
        assert qdrv.launch(s).note == "already launched"
        assert qdrv.pause(d).state == "paused"
        assert qdrv.resume(d).state == "running"
        assert qdrv.snapshot(d, "s1", job_id=2).to_json() == {"state": "running", "changed": True, "snapshot": "s1"}
        # a virtio balloon, but no guest driver to inflate it: read back, the running VM still has 64 MiB
        resized = qdrv.set_resources(d, memory_mib=48, vcpus=2)
        assert (resized.memory_mib, resized.memory_mib_live, resized.vcpus_live, resized.live) == (48, 64, 2, False)
        assert "the running guest still has 64 MiB" in resized.note
        # vCPU hot-unplug needs the guest's help: refused, and the running VM keeps 2
        resized = qdrv.set_resources(d, memory_mib=None, vcpus=1)
        assert (resized.vcpus, resized.vcpus_live, resized.live) == (1, 2, False) and "vcpus applies" in resized.note
        assert qdrv.kill(d).state == "shutoff"
        assert qdrv.kill(d).changed is False
        result = qdrv.revert(d, "s1")
        assert (result.state, result.memory_mib) == ("running", 64)
        assert qdrv.status(d).snapshots == ["s1"]
    finally:
        disk = Path(qdrv.status(d).metadata.get("disk") or "/nonexistent")
        result = qdrv.delete(d)
    assert result.changed is True and result.disks_removed == (str(disk),)
    assert not disk.exists()
    assert qdrv.status(d).state == VmState.MISSING


@qemu
@pytest.mark.qemu
def test_qemu_snapshot_sizes_are_the_guest_state_saved(qdrv: Driver) -> None:
    s = DomainSpec(namespace="q", vm="sz", memory_mib=64, vcpus=1, disk_gib=1, job_id=1)
    try:
        qdrv.launch(s)
        # 48 MiB set for the next boot; the guest (no balloon driver) keeps its 64
        assert qdrv.set_resources(s.domain, memory_mib=48, vcpus=None).memory_mib_live == 64
        qdrv.snapshot(s.domain, "hot", job_id=2)  # the running guest's RAM and devices go in with it
        qdrv.kill(s.domain)
        qdrv.snapshot(s.domain, "cold", job_id=3)  # qemu-img snapshot: the disk alone
        sizes = {str(d["name"]): d["size_bytes"] for d in qdrv.snapshot_details(s.domain)}
        assert sizes == qcow2_snapshot_sizes(qdrv.disk_path(s.domain))
        hot = sizes["hot"]
        assert sizes["cold"] == 0 and isinstance(hot, int) and 0 < hot < 2 * 64 * 2**20, sizes
        # back to the running guest of that time: what is set then, and what it ran with, read back
        reverted = qdrv.revert(s.domain, "hot")
        assert (reverted.state, reverted.memory_mib, reverted.memory_mib_live) == ("running", 48, 64), reverted
    finally:
        qdrv.delete(s.domain)


@qemu
@pytest.mark.qemu
def test_qemu_stop_timeout(qdrv: Driver, caplog: pytest.LogCaptureFixture) -> None:
    # An OS-less guest never answers the ACPI power button: graceful stop can only time out.
    s = DomainSpec(namespace="q", vm="stop", memory_mib=64, vcpus=1, disk_gib=0)
    try:
        qdrv.launch(s)
        checks: list[int] = []
        started = time.monotonic()
        caplog.set_level(logging.INFO, logger="worker.libvirtconn")
        with pytest.raises(OperationTimeout, match=r"did not shut down within 4s \(2 shutdown requests, 3s apart\)") \
                as err:
            qdrv.stop(s.domain, timeout_s=4, force=False, check=lambda: checks.append(1))
        assert err.value.hint is not None and "--force" in err.value.hint
        assert 4 <= time.monotonic() - started < 8 and len(checks) >= 10
        assert sum("libvirt change: shutdown " in r.message for r in caplog.records) == 2  # at 0 and 3 s
        assert qdrv.status(s.domain).state == VmState.RUNNING

        result = qdrv.stop(s.domain, timeout_s=0, force=False, check=_noop)  # one press, no wait
        assert result.to_json() == {"state": "running", "changed": True,
                                    "note": "shutdown requested; not waited for (--timeout 0)"}

        result = qdrv.stop(s.domain, timeout_s=1, force=False, force_after_timeout=True, check=_noop)
        assert (result.state, result.note) == ("shutoff", "forced off after 1s: the guest did not shut down "
                                                          "(1 shutdown request)")
        qdrv.start(s.domain)
        started = time.monotonic()
        assert qdrv.stop(s.domain, timeout_s=60, force=True, check=_noop).note == "forced off"
        assert time.monotonic() - started < 3
    finally:
        qdrv.delete(s.domain)


@qemu
@pytest.mark.qemu
def test_qemu_reboot_of_a_guest_that_ignores_it_fails(qdrv: Driver) -> None:
    # No OS: nobody acts on the ACPI request, libvirt reports no reboot. A reset (--force) does happen.
    s = DomainSpec(namespace="q", vm="reboot", memory_mib=64, vcpus=1, disk_gib=0)
    try:
        qdrv.launch(s)
        started = time.monotonic()
        with pytest.raises(OperationTimeout) as err:
            qdrv.reboot(s.domain, timeout_s=4, check=_noop)
        assert err.value.message == ("reboot did not happen: the guest did not react to the reboot request within "
                                     "4s (2 reboot requests, 3s apart)")
        assert err.value.hint is not None and "vm reboot --force" in err.value.hint
        assert 4 <= time.monotonic() - started < 8
        assert qdrv.reboot(s.domain, timeout_s=0, check=_noop).note == "reboot requested; not waited for (--timeout 0)"
        result = qdrv.reboot(s.domain, force=True, check=_noop)
        assert (result.state, result.changed) == ("running", True)
    finally:
        qdrv.delete(s.domain)


@pytest.mark.skipif(not HAVE_QEMU_IMG, reason="qemu-img is not installed")
def test_launch_on_a_backing_image(drv: Driver, vmns: str, tmp_path: Path) -> None:
    base = drv.images_dir / "base.qcow2"  # an image of the host's store (the catalog puts them there)
    base.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "3M"], check=True)
    drv.launch(spec(vmns, image=str(base), disk_gib=1))
    disk = drv.disk_path(f"{vmns}.vm1")
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)], capture_output=True, check=True)
    data = json.loads(info.stdout)
    assert (data["backing-filename"], data["backing-filename-format"]) == (str(base), "qcow2")
    assert data["virtual-size"] == 1024**3

    outside = tmp_path / "outside.qcow2"  # a file of the host, not of its image store: refused
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(outside), "3M"], check=True)
    for image in (str(outside), str(drv.images_dir / "nope.qcow2"), str(drv.images_dir / ".." / "outside.qcow2")):
        with pytest.raises(InvalidInput, match="not in this host's image store"):
            drv.launch(spec(vmns, "vm2", image=image))
    assert drv.status(f"{vmns}.vm2").state == VmState.MISSING


def test_failed_launch_leaves_nothing_behind(drv: Driver, vmns: str, tmp_path: Path) -> None:
    with pytest.raises(HypervisorError) as err:
        drv.launch(spec(vmns, memory_mib=2**53))  # libvirt's own parser refuses it (numerical overflow)
    assert "cannot define" in err.value.message
    assert drv.status(f"{vmns}.vm1").state == VmState.MISSING
    assert not drv.disk_path(f"{vmns}.vm1").exists()


@qemu
@pytest.mark.qemu
def test_qemu_second_embedded_root_is_refused_with_a_hint(qdrv: Driver, tmp_path: Path) -> None:
    with pytest.raises(HypervisorError) as err:
        Driver(f"qemu:///embed?root={tmp_path / 'other'}", tmp_path / "disks")
    assert err.value.hint is not None and "one embedded QEMU root per process" in err.value.hint
