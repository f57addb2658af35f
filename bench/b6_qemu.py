"""B6: launch and start real QEMU VMs (libvirt's embedded driver) on 2 hosts through vmorch, next
to the same VMs defined and started by a plain loop over one direct libvirt connection."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import libvirt

from orchestrator.model.operation import Op, Operation
from orchestrator.services.client import RedisClient
from worker import domxml
from worker.driver import Driver

from .common import require_succeeded
from .harness import Env
from .suite import Row, Sizes, at_most

TARGET = 1.2
NS = "real"
MEMORY_MIB = 32


def qemu_pids(root: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(root).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def direct_loop(conn: libvirt.virConnect, names: list[str]) -> float:
    """The baseline: define and start each domain in turn, the same XML vmorch would write."""
    xmls = [domxml.domain_xml(name=n, virt_type="qemu", memory_mib=MEMORY_MIB, vcpus=1, disk=None,
                              meta=domxml.VmorchMeta("direct", n)) for n in names]
    t = time.perf_counter()
    doms = []
    for xml in xmls:
        dom = conn.defineXML(xml)  # as worker.driver defines
        dom.create()
        doms.append(dom)
    took = time.perf_counter() - t
    for dom in doms:
        dom.destroy()
        dom.undefine()
    return took


def through_vmorch(client: RedisClient, names: list[str], hosts: list[str]) -> float:
    ops = [Operation.build(Op.LAUNCH, NS, n, memory_mib=MEMORY_MIB, disk_gib=0, host=hosts[i % len(hosts)])
           for i, n in enumerate(names)]
    t = time.perf_counter()
    jobs = client.submit(ops)
    done = client.wait([j.id for j in jobs], timeout=300)
    took = time.perf_counter() - t
    require_succeeded(done)
    deleted = client.submit([Operation.build(Op.DELETE, NS, n) for n in names])
    require_succeeded(client.wait([j.id for j in deleted], timeout=300))
    return took


def run(env: Env, sizes: Sizes) -> list[Row]:
    hosts = [f"q{i}" for i in range(1, sizes.b6_hosts + 1)]
    for h in hosts:
        env.worker(h, f"qemu:///embed?root={env.home / h}")
    direct = Driver(f"qemu:///embed?root={env.home / 'direct'}", env.home / "direct-disks")
    try:
        env.wait_hosts(*hosts)
        client = RedisClient(env.settings)
        # warm-up: the first QEMU start of each side reads the binary and firmware from disk
        direct_loop(direct.conn, ["warm"])
        through_vmorch(client, [f"warm{i}" for i in range(len(hosts))], hosts)
        base = direct_loop(direct.conn, [f"d{i}" for i in range(sizes.b6_vms)])
        ours = through_vmorch(client, [f"vm{i}" for i in range(sizes.b6_vms)], hosts)
    finally:
        direct.close()
        for pid in qemu_pids(env.home):  # nothing may outlive the benchmark
            os.kill(pid, signal.SIGKILL)
    return [Row("B6", f"launch+start {sizes.b6_vms} QEMU VMs ({MEMORY_MIB} MiB) on {len(hosts)} hosts",
                f"{ours:.2f} s", f"{base:.2f} s direct libvirt loop", *at_most(ours / base, TARGET))]
