"""This host's networks, kept true every few seconds, and packet captures on request.

The sweep (``NetSync.round``): the gateways this host holds are up (bridge, address, DHCP, NAT) and
a new network's is marked ready; a network marked deleting whose gateway is here is torn down and
forgotten; a bridge no VM uses any more goes (a guest that powered itself off leaves one behind);
each bridge's VXLAN peers follow the hosts that have the network up; the DHCP leases are published.
A job stopping or deleting a VM lets its bridges go at once (``worker.nichandlers``): the sweep is
the safety net, and how a guest's own power-off is noticed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from redis import Redis
from redis.exceptions import RedisError

from orchestrator.control.locks import LockManager, cmd_lock
from orchestrator.control.networks import CAPTURE_MAX_BYTES, CAPTURE_TASK, WAKE_TASK, net_lock
from orchestrator.model.errors import ExecError, VmorchError
from orchestrator.model.network import Network
from orchestrator.model.records import JobState
from orchestrator.store import keys

from . import netdev
from .background import Background
from .vmnet import HostNet

log = logging.getLogger(__name__)
#: a gateway found whole is checked again (dnsmasq alive, rules in place) this often
RECHECK_S = 20.0


class NetSync(Background):
    thread_name = "netsync"
    join_timeout = 10.0

    def __init__(self, host_net: HostNet, locks: LockManager, *, interval: float = 2.0,
                 lock_timeout: float = 10.0) -> None:
        self.net = host_net
        self.locks = locks
        self.interval = interval
        self.lock_timeout = lock_timeout
        self._checked: dict[int, float] = {}
        self._wake = threading.Event()
        super().__init__()

    def wake(self) -> None:
        """Sweep now (a network was just created or marked deleting), not at the next interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        super().stop()

    def _loop(self) -> None:
        try:  # probed here, not before the host's first heartbeat: tc and pyroute2 take a while
            self.net.redis.hset(keys.host(self.net.host), "shaping", ",".join(sorted(netdev.shaping_support())))
        except (RedisError, VmorchError, OSError) as exc:
            log.warning("link emulation probe: %s", exc)
        while True:
            try:
                self.round()
            except (RedisError, VmorchError, OSError) as exc:
                log.warning("network sweep: %s", exc)
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return

    def round(self) -> None:
        nets = self.net.records.everywhere()
        self._gateways(nets)
        here = self._bridges({n.vni: n for n in nets})
        hn, records = self.net, self.net.records
        for net in nets:
            if hn.host in net.hosts and net.vni not in here:
                records.host_down(net.namespace, net.name, hn.host)
            if net.gateway_host == hn.host and net.dhcp and net.vni in here:
                records.set_leases(net, netdev.leases(net.vni, hn.state_dir))

    def _gateways(self, nets: list[Network]) -> None:
        """The networks this host is the gateway of: up, torn down, or due for deletion."""
        hn = self.net
        for net in nets:
            if net.delete_after is not None and net.state != "deleting" and net.gateway_host in (hn.host, ""):
                self._teardown_due(net)
            if net.gateway_host != hn.host:
                continue
            try:
                if net.state == "deleting":
                    self._tear_down(net)
                else:
                    self._gateway(net)
            except ExecError as exc:
                log.warning("network %s/%s: %s", net.namespace, net.name, exc.message)
                hn.records.set_error(net, exc.message)

    def _bridges(self, by_vni: dict[int, Network]) -> set[int]:
        """Each bridge here: gone if unused (or its network is), else its VXLAN peers made current."""
        hn, here = self.net, set()
        for seg in netdev.segments():
            if not hn.owns(seg.vni):  # another vmorch's on this kernel, or one this host never made
                continue
            here.add(seg.vni)
            found = by_vni.get(seg.vni)
            if found is None or (found.state == "deleting" and found.gateway_host != hn.host):
                self._orphan(seg)
            elif not seg.ports and not seg.gateway:
                hn.release_vni(seg.vni, owner=(found.namespace, found.name))
            else:
                netdev.set_peers(seg.vni, hn.peers(found))
        return here

    def _gateway(self, net: Network) -> None:
        hn = self.net
        seg = next((s for s in netdev.segments() if s.vni == net.vni), None)
        whole = seg is not None and seg.gateway
        if net.state == "ready" and whole and time.monotonic() - self._checked.get(net.vni, 0) < RECHECK_S:
            return
        with hn.vni_lock(net.vni):
            hn.bring_up(net)
            netdev.gateway_up(net.vni, net.subnet, dhcp=net.dhcp, nat=net.nat, state_dir=hn.state_dir)
        self._checked[net.vni] = time.monotonic()
        if net.state == "creating":
            with self.locks.hold(net_lock(net.namespace, net.name), timeout=self.lock_timeout):
                now = hn.records.get(net.namespace, net.name)
                if now is not None and now.state == "creating":  # LOCK: net -- not marked deleting meanwhile
                    hn.records.set_ready(now)
                    log.info("network %s/%s is up (VNI %d, gateway %s)", net.namespace, net.name, net.vni,
                             net.gateway)

    def _teardown_due(self, net: Network) -> None:
        """An experiment's network: marked deleting once its teardown job is final and no VM is on it."""
        state = self.net.redis.hget(keys.job(net.delete_after or 0), "state")
        if state is not None and not JobState(str(state)).final:
            return
        records = self.net.records
        with self.locks.hold(cmd_lock(net.namespace), net_lock(net.namespace, net.name), timeout=self.lock_timeout):
            if records.get(net.namespace, net.name) is not None and not records.users(net.namespace, net.name):
                records.mark_deleting(net.namespace, net.name)  # LOCK: cmd, net
                log.info("network %s/%s: its experiment's teardown is over; deleting it", net.namespace, net.name)

    def _tear_down(self, net: Network) -> None:
        hn = self.net
        with self.locks.hold(net_lock(net.namespace, net.name), timeout=self.lock_timeout):
            with hn.vni_lock(net.vni):
                netdev.gateway_down(net.vni, hn.state_dir)
                seg = next((s for s in netdev.segments() if s.vni == net.vni), None)
                if seg is not None and not seg.ports:
                    netdev.remove_segment(net.vni)
                    (hn.state_dir / f"seg-{net.vni}").unlink(missing_ok=True)
            hn.records.forget(net)  # LOCK: net
        self._checked.pop(net.vni, None)
        log.info("network %s/%s is deleted (VNI %d)", net.namespace, net.name, net.vni)

    def _orphan(self, seg: netdev.Segment) -> None:
        """A bridge whose network is gone: its gateway (if it was here) and the bridge go, once unused."""
        hn = self.net
        if seg.ports:
            return
        with hn.vni_lock(seg.vni):
            if seg.gateway:
                netdev.gateway_down(seg.vni, hn.state_dir)
            netdev.remove_segment(seg.vni)
            (hn.state_dir / f"seg-{seg.vni}").unlink(missing_ok=True)


def register(app: Celery, blobs: Redis, net_sync: NetSync | None) -> None:
    """This host's network tasks: a sweep woken by the submit side, and captures."""

    @app.task(name=WAKE_TASK, acks_late=False)  # type: ignore[untyped-decorator]
    def wake() -> None:
        if net_sync is not None:
            net_sync.wake()

    register_capture(app, blobs)


def register_capture(app: Celery, blobs: Redis) -> Any:
    @app.task(name=CAPTURE_TASK, acks_late=False)  # type: ignore[untyped-decorator]
    def capture(capture_id: str, target: dict[str, Any], seconds: float) -> None:
        """Packets on a network's bridge (``vni``) or a VM's NIC (``domain``, ``nic``), to Redis for the asker."""
        try:
            if "vni" in target:
                dev = netdev.bridge_name(int(target["vni"]))
            else:
                dev = netdev.tap_name(str(target["domain"]), int(target["nic"]))
            data = b"ok:" + netdev.capture(dev, seconds=min(float(seconds), 300.0), max_bytes=CAPTURE_MAX_BYTES)
        except (VmorchError, OSError, ValueError, KeyError) as exc:
            message = exc.message if isinstance(exc, VmorchError) else str(exc)
            data = b"error:" + message.encode()
        blobs.set(keys.capture(capture_id), data, ex=keys.CAPTURE_TTL)

    return capture

