"""A VM's NICs on this host: the kernel devices behind them (``worker.netdev``), made before its QEMU
starts and let go once it stops.

A network's bridge on this host exists while a VM of this host has a NIC on it (and, on its
gateway host, while the network lives). Making it and starting a QEMU process that plugs a tap
into it, or finding it idle and removing it, are one step each under a *kernel-local* lock (an
``flock`` on ``/run/vmorch/net/<vni>.lock``): the bridge is this kernel's, and several vmorch hosts
may share one kernel (the local cluster). It is no lock of the hierarchy: nothing waits on Redis
or another host while holding it, and it is taken last, after the VM's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from orchestrator.model.errors import ExecError, InvalidInput
from orchestrator.model.network import Network, Nic, Shaping
from orchestrator.model.records import Vm
from orchestrator.store.networks import NetworkRecords

from . import netdev
from .domxml import NicDevice

log = logging.getLogger(__name__)
LOCK_DIR = Path("/run/vmorch/net")


@dataclass
class HostNet:
    """This host's side of vmorch networks (one per worker process: ``configure``)."""

    redis: Redis
    host: str
    #: this host's address on the network between hosts (VXLAN's outer source and destination)
    underlay: str
    #: dnsmasq's pid and lease files, one folder per network (``netdev.gateway_up``)
    state_dir: Path

    @property
    def records(self) -> NetworkRecords:
        return NetworkRecords(self.redis)

    @contextlib.contextmanager
    def vni_lock(self, vni: int) -> Iterator[None]:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR / f"{vni}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def networks_of(self, vm: Vm) -> list[Network]:
        return networks_of(self.records, vm)

    def owns(self, vni: int) -> bool:
        """Whether this host made the VNI's bridge (or holds its gateway). Another vmorch on this kernel
        (a second cluster, a test run) has bridges of its own, which this host must never touch."""
        return (self.state_dir / f"seg-{vni}").exists() or (self.state_dir / f"net-{vni}").exists()

    def peers(self, net: Network) -> set[str]:
        """The underlay addresses of the other kernels with the network up (a host on this kernel is none)."""
        return {addr for host, addr in net.hosts.items() if host != self.host and addr != self.underlay}

    def bring_up(self, net: Network) -> None:
        """The network's bridge and VXLAN here, and this host in its record. # LOCK: vni_lock."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / f"seg-{net.vni}").touch()  # what this host made, for 'vmorch down' to take away
        # over loopback (hosts sharing one kernel) the underlay's MTU says nothing about the guests'
        netdev.ensure_segment(net.vni, self.underlay, mtu=1500 if self.underlay.startswith("127.") else None)
        self.records.host_up(net.namespace, net.name, self.host, self.underlay)
        fresh = self.records.get(net.namespace, net.name) or net
        netdev.set_peers(net.vni, self.peers(fresh))

    @contextlib.contextmanager
    def attached(self, vm: Vm) -> Iterator[None]:
        """Its networks' bridges are up here while the body (which starts its QEMU) runs, and no idle
        sweep removes one meanwhile; then each NIC gets its link emulation."""
        nets = self.networks_of(vm)
        with contextlib.ExitStack() as stack:
            for vni in sorted({n.vni for n in nets}):
                stack.enter_context(self.vni_lock(vni))
            for net in {n.vni: n for n in nets}.values():
                self.bring_up(net)
            yield
        self.shape_all(vm)

    def shape_all(self, vm: Vm) -> None:
        for i, nic in enumerate(vm.nics):
            if not nic.shaping.empty:
                self.shape(vm, i, nic.shaping)

    def shape(self, vm: Vm, index: int, shaping: Shaping) -> None:
        netdev.shape(netdev.tap_name(vm.domain, index), delay_ms=shaping.delay_ms, loss_pct=shaping.loss_pct,
                     rate_kbit=shaping.rate_kbit)

    def release(self, vm: Vm) -> None:
        """After its QEMU stopped: the bridges no VM of this kernel uses any more go (not a gateway's)."""
        for vni in sorted({v for nic in vm.nics if (v := self._vni(vm, nic)) is not None}):
            try:
                self.release_vni(vni)
            except ExecError as exc:  # the periodic sweep (``worker.netsync``) tries again
                log.warning("could not remove the idle bridge of VNI %s: %s", vni, exc.message)

    def release_vni(self, vni: int, owner: tuple[str, str] | None = None) -> bool:
        """Remove the VNI's bridge here if no VM port and no gateway is on it; True if it went."""
        with self.vni_lock(vni):
            seg = next((s for s in netdev.segments() if s.vni == vni), None)
            if seg is None or seg.ports or seg.gateway or not self.owns(vni):
                return False
            netdev.remove_segment(vni)
            (self.state_dir / f"seg-{vni}").unlink(missing_ok=True)
        if owner is None:
            owner = self.records.by_vni().get(vni)
        if owner is not None:
            self.records.host_down(owner[0], owner[1], self.host)
        return True

    def _vni(self, vm: Vm, nic: Nic) -> int | None:
        net = self.records.get(vm.namespace, nic.net)
        return net.vni if net is not None else None


def networks_of(records: NetworkRecords, vm: Vm) -> list[Network]:
    """The VM's networks, in NIC order; a missing or dying one is this job's clear failure."""
    out = []
    for nic in vm.nics:
        net = records.get(vm.namespace, nic.net)
        if net is None or net.state == "deleting":
            raise ExecError(f"network {nic.net!r} of VM {vm.name!r} is {'being deleted' if net else 'gone'}",
                            hint=f"create it again ('vmorch net create {nic.net} --subnet CIDR'), or delete the VM")
        out.append(net)
    return out


def devices(records: NetworkRecords, vm: Vm) -> tuple[NicDevice, ...]:
    """What the VM's domain definition plugs its NICs into."""
    return tuple(NicDevice(bridge=netdev.bridge_name(net.vni), mac=nic.mac, tap=netdev.tap_name(vm.domain, i))
                 for i, (nic, net) in enumerate(zip(vm.nics, networks_of(records, vm), strict=True)))


def take_down_all(state_dir: Path) -> int:
    """Every gateway and idle bridge this host made (its worker has stopped: the local cluster's
    ``down``); returns how many bridges went. Bridges with a VM port stay."""
    gone = 0
    marked = {int(p.name.split("-", 1)[1]) for p in state_dir.glob("seg-*") if p.name.split("-", 1)[1].isdigit()}
    gateways = {int(p.name.split("-", 1)[1]) for p in state_dir.glob("net-*") if p.name.split("-", 1)[1].isdigit()}
    for vni in sorted(gateways):
        netdev.gateway_down(vni, state_dir)
    for seg in netdev.segments():
        if seg.vni in marked | gateways and not seg.ports:
            netdev.remove_segment(seg.vni)
            (state_dir / f"seg-{seg.vni}").unlink(missing_ok=True)
            gone += 1
    return gone


_host_net: HostNet | None = None


def configure(host_net: HostNet | None) -> None:
    """Set this process's host networking (None: a test-driver host, whose domains plug into nothing)."""
    global _host_net
    _host_net = host_net


def current() -> HostNet | None:
    return _host_net


def check_nic(vm: Vm, index: int) -> Nic:
    if index >= len(vm.nics):
        raise InvalidInput(f"VM {vm.name!r} has {len(vm.nics)} NIC(s) on vmorch networks; there is no NIC {index}",
                           hint=f"see 'vmorch vm show {vm.name}' (NICs count from 0)")
    return vm.nics[index]
