"""KVM or TCG: each worker finds out at start (``worker.accel.probe``, ``VMORCH_ACCEL`` forces it),
reports it on its host record, defines domains of its type, and a VM defined under KVM still starts
on a TCG host (moved there, or its host restarted without KVM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from orchestrator.model.settings import Settings
from worker import agent, domxml
from worker.accel import Accel, probe

from .conftest import run_cli, start_worker, wait_hosts_up
from .guestvm import GuestCluster, domain_xml_file, guest_cluster, qemu_pids, root_of


def test_the_environment_forces_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in ("kvm", "tcg"):
        monkeypatch.setenv("VMORCH_ACCEL", kind)
        assert probe() == Accel(kind, "forced by VMORCH_ACCEL")


def test_a_definition_is_localized_for_the_host_that_imports_it() -> None:
    meta = domxml.VmorchMeta("ns", "vm", disk="/a/ns.vm.qcow2")
    xml = domxml.domain_xml(name="ns.vm", virt_type="kvm", memory_mib=64, vcpus=2, disk="/a/ns.vm.qcow2", meta=meta)
    assert domxml.console_of(xml) == ("/a/ns.vm.console.log", None)
    here = domxml.localize(xml, virt_type="qemu", console_log="/b/ns.vm.console.log")
    assert domxml.domain_type(here) == "qemu" and domxml.console_of(here)[0] == "/b/ns.vm.console.log"
    assert domxml.parse_resources(here)[2:] == (2, 8)  # vcpus current 2, maximum 8
    assert domxml.domain_type(domxml.localize(here, virt_type="kvm", console_log=None)) == "kvm"
    test_xml = domxml.domain_xml(name="ns.vm", virt_type="test", memory_mib=64, vcpus=1, disk=None, meta=meta)
    assert domxml.domain_type(domxml.localize(test_xml, virt_type="qemu", console_log=None)) == "test"


def test_deep_embedded_roots_get_a_short_agent_socket_directory(tmp_path: Path) -> None:
    assert agent.socket_dir("qemu:///system") is None and agent.socket_dir("test:///default") is None
    assert agent.socket_dir("qemu:///embed?root=/srv/vmorch/q") is None  # libvirt's own paths fit
    deep = tmp_path / ("x" * 60)
    found = agent.socket_dir(f"qemu:///embed?root={deep}")
    assert found is not None and found == agent.socket_dir(f"qemu:///embed?root={deep}")
    assert stat.S_IMODE(found.stat().st_mode) == 0o700
    domxml.use_agent_socket_dir(found)
    try:
        socket = domxml.agent_socket("a-namespace-name.and-a-rather-long-vm-name-of-sixty-characters-xxxxx")
        assert socket is not None and len(socket.encode()) < 108 and socket.startswith(str(found))
    finally:
        domxml.use_agent_socket_dir(None)
        found.rmdir()


def _hosts(cluster: GuestCluster) -> dict[str, dict[str, object]]:
    done = run_cli(cluster.settings, "--json", "host", "list")
    return {h["name"]: h for h in json.loads(done.stdout)}


def _accel_of_qemu(root: Path) -> str:
    [pid] = qemu_pids(root)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    found = re.search(rb"accel[= ](kvm|tcg)", cmdline)
    assert found, cmdline
    return found.group(1).decode()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_forced_accelerators_and_a_vm_going_from_kvm_to_tcg(base_settings: Settings,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """On this machine KVM is broken (the probe says tcg): forcing kvm is honoured all the same -- the
    domain is type kvm and QEMU runs with KVM (a real guest then stops at its first protected-mode code).
    Moved to a TCG host, or after its host restarts without KVM, the same VM starts under TCG."""
    with guest_cluster(base_settings, tmp_path_factory.mktemp("accel"), f"accel{os.getpid() % 10000}",
                       {"ak1": {"VMORCH_ACCEL": "kvm"}, "at1": {"VMORCH_ACCEL": "tcg"}}) as cluster:
        hosts = _hosts(cluster)
        assert (hosts["ak1"]["accel"], hosts["at1"]["accel"]) == ("kvm", "tcg")
        assert hosts["ak1"]["accel_reason"] == "forced by VMORCH_ACCEL"
        shown = run_cli(cluster.settings, "host", "show", "at1").stdout
        assert "tcg (forced by VMORCH_ACCEL)" in shown

        kvm_root, tcg_root = root_of(cluster.workers[0]), root_of(cluster.workers[1])
        domain = f"{cluster.namespace}.v1"
        cluster.launch("v1", host="ak1", image=None, memory_mib=64)
        assert "<domain type='kvm'>" in domain_xml_file(cluster.workers[0], domain)
        assert _accel_of_qemu(kvm_root) == "kvm"
        for args in (("kill", "v1"), ("move", "v1", "--to", "at1"), ("start", "v1")):
            done = run_cli(cluster.settings, "vm", *args, "--wait", timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr
        assert "<domain type='qemu'>" in domain_xml_file(cluster.workers[1], domain)
        assert _accel_of_qemu(tcg_root) == "tcg"
        assert domxml.console_of(domain_xml_file(cluster.workers[1], domain))[0] == \
            str(domxml.console_log_path(base_settings.home / "hosts" / "at1" / "disks", domain))

        # a shut-off VM defined under KVM, and its host restarted without it: redefined as qemu, it starts
        cluster.launch("v2", host="ak1", image=None, memory_mib=64)
        assert run_cli(cluster.settings, "vm", "kill", "v2", "--wait").returncode == 0
        cluster.workers[0].stop()
        cluster.workers[0] = start_worker(base_settings, "ak1", cluster.workers[0].libvirt_uri, concurrency=2,
                                          env={"VMORCH_ACCEL": "tcg"})
        wait_hosts_up(base_settings, cluster.workers[0], timeout=90)
        assert _hosts(cluster)["ak1"]["accel"] == "tcg"
        assert "<domain type='qemu'>" in domain_xml_file(cluster.workers[0], f"{cluster.namespace}.v2")
        assert run_cli(cluster.settings, "vm", "start", "v2", "--wait").returncode == 0
        assert _accel_of_qemu(kvm_root) == "tcg"
