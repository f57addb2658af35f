"""Live migration between two real libvirtd hosts.

Each "host" is a libvirtd in its own network, mount and UTS namespace (own hostname, host
UUID, /var/run/libvirt), joined to the other by a veth pair, so libvirt and QEMU migrate
over a real TCP link. The workers stay in the root namespace and talk to each libvirtd
through its unix socket. Disks live on the root filesystem, which both hosts see at the
same path: shared storage, as a real cluster needs for live moves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.model.operation import Op
from orchestrator.model.records import JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import WorkerProc, ops, running_hosts, start_worker, wait_until

TOOLS = ("ip", "unshare", "qemu-system-x86_64")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/libvirtd")
                       or any(shutil.which(t) is None for t in TOOLS),
                       reason="needs root, libvirtd, ip, unshare and QEMU"),
]


@dataclass
class Libvirtd:
    name: str
    netns: str
    ip: str
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.dir}/run/libvirt-sock"

    @property
    def migrate_uri(self) -> str:
        return f"qemu+tcp://{self.ip}/system"

    def qemu_pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if b"qemu-system" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _start(name: str, netns: str, ip: str, base: Path) -> Libvirtd:
    d = base / name
    for sub in ("etc", "lib", "run", "log", "cache"):
        (d / sub).mkdir(parents=True)
    (d / "etc" / "libvirtd.conf").write_text(
        f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{ip}"\nauth_tcp = "none"\nauth_unix_rw = "none"\n'
        f'host_uuid = "{uuid.uuid4()}"\nlog_outputs = "3:file:{d}/log/libvirtd.log"\n')
    (d / "etc" / "qemu.conf").write_text(
        f'user = "root"\ngroup = "root"\nsecurity_driver = "none"\nstdio_handler = "file"\n'
        f'migration_address = "{ip}"\nmigration_host = "{ip}"\n')
    binds = " && ".join(f"mkdir -p {target} && mount --bind {d / sub} {target}" for sub, target in (
        ("etc", "/etc/libvirt"), ("lib", "/var/lib/libvirt"), ("run", "/var/run/libvirt"),
        ("cache", "/var/cache/libvirt")))
    script = (f"hostname {name} && {binds} && exec /usr/sbin/libvirtd --listen "
              f"-p /var/run/libvirt/libvirtd.pid -f /etc/libvirt/libvirtd.conf")
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "-m", "-u", "--propagation", "private",
                             "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = Libvirtd(name, netns, ip, d, proc)
    wait_until(lambda: (d / "run" / "libvirt-sock").exists(), timeout=20, what=f"libvirtd {name}")
    return host


def _stop(host: Libvirtd) -> None:
    import libvirt

    try:
        conn = libvirt.open(host.uri)
        for dom in conn.listAllDomains():
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()
    except libvirt.libvirtError:
        pass
    host.proc.send_signal(signal.SIGTERM)
    try:
        host.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        host.proc.kill()
        host.proc.wait()


@pytest.fixture(scope="module")
def libvirtd_pair() -> Iterator[tuple[Libvirtd, Libvirtd]]:
    tag = f"{os.getpid() % 100000}"
    names = (f"vma{tag}", f"vmb{tag}")
    base = Path(tempfile.mkdtemp(prefix="vml"))
    for ns in names:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    hosts: list[Libvirtd] = []
    try:
        veth = (f"va{tag}", f"vb{tag}")
        subprocess.run(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]], check=True)
        for ns, dev, ip in zip(names, veth, ("10.199.0.1", "10.199.0.2"), strict=True):
            subprocess.run(["ip", "link", "set", dev, "netns", ns], check=True)
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        hosts = [_start("lva", names[0], "10.199.0.1", base), _start("lvb", names[1], "10.199.0.2", base)]
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            _stop(host)
        leftover = [pid for host in hosts for pid in host.qemu_pids()]
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"QEMU processes outlived the test: {leftover}"


@pytest.fixture
def live_hosts(libvirtd_pair: tuple[Libvirtd, Libvirtd], base_settings: Settings) -> Iterator[list[WorkerProc]]:
    workers = [start_worker(base_settings, d.name, d.uri, args=["--migrate-uri", d.migrate_uri, "--shared-storage"])
               for d in libvirtd_pair]
    with running_hosts(base_settings, *workers) as ws:
        yield ws


def test_live_move_between_two_libvirtd_hosts(libvirtd_pair: tuple[Libvirtd, Libvirtd],
                                              live_hosts: list[WorkerProc], client: RedisClient) -> None:
    a, b = libvirtd_pair
    ns = client.settings.namespace
    jobs = client.submit(ops(Op.LAUNCH, ns, "alive", memory_mib=64, host="lva"))
    assert client.wait([j.id for j in jobs], timeout=120)[0].state is JobState.SUCCEEDED
    assert len(a.qemu_pids()) == 1 and not b.qemu_pids()
    started = time.monotonic()
    # moved while running, and a job queued right behind the move runs on the new host
    jobs = client.submit(ops(Op.MOVE_OUT, ns, "alive", to="lvb", live=True) + ops(Op.PAUSE, ns, "alive"))
    out, into, pause = client.wait([j.id for j in jobs], timeout=120)
    took = time.monotonic() - started
    assert (out.state, into.state, pause.state) == (JobState.SUCCEEDED,) * 3, (out.error, into.error, pause.error)
    assert out.result is not None and "live-migrated" in out.result["note"]
    vm = client.vm(ns, "alive")
    assert (vm.host, vm.state) == ("lvb", VmState.PAUSED)
    assert not a.qemu_pids() and len(b.qemu_pids()) == 1, "the VM should run in lvb's namespace now"
    print(f"live move + pause: {took:.2f}s")
    [delete] = client.submit(ops(Op.DELETE, ns, "alive"))
    assert client.wait([delete.id], timeout=60)[0].state is JobState.SUCCEEDED


def test_live_move_of_a_shut_off_vm_is_refused(live_hosts: list[WorkerProc], client: RedisClient) -> None:
    ns = client.settings.namespace
    jobs = client.submit(ops(Op.LAUNCH, ns, "cold", memory_mib=64, host="lva", disk_gib=0))
    client.wait([j.id for j in jobs], timeout=120)
    [kill] = client.submit(ops(Op.KILL, ns, "cold"))
    client.wait([kill.id])
    with pytest.raises(Exception, match="only a running VM moves live"):
        client.submit(ops(Op.MOVE_OUT, ns, "cold", to="lvb", live=True))
