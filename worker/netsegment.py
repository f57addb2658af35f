"""A vmorch network's segment on this host: one Linux bridge per network and a VXLAN device
enslaved to it that carries the network to the other hosts over their underlay addresses.

Everything here acts on the network namespace of the calling process and is idempotent: a second
call, or one after a crash that left half a segment, ends in the same state. Several vmorch hosts
may share one network namespace (the local cluster); they then share each network's segment, by
name, and only the last of them may remove it.

``worker.netdev`` gathers the whole API of the host's network side.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import socket
import subprocess
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from orchestrator.model.errors import ExecError

from .netfilter import BRIDGE_PREFIX, admit_bridge, forget_bridge

VXLAN_PORT = 4789
#: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
VXLAN_OVERHEAD = 50
MAX_VNI = 2**24 - 1
_ZERO_MAC = "00:00:00:00:00:00"
_BRIDGE_RE = re.compile(rf"^{BRIDGE_PREFIX}(\d+)$")


def bridge_name(vni: int) -> str:
    return f"{BRIDGE_PREFIX}{_vni(vni)}"


def vxlan_name(vni: int) -> str:
    return f"vmvx{_vni(vni)}"


def tap_name(domain: str, index: int) -> str:
    """A VM's tap for its ``index``-th network: stable across restarts, 13 characters."""
    if not 0 <= index <= 9:
        raise ExecError(f"a VM has network ports 0 to 9, not {index}")
    return "vt" + hashlib.sha256(domain.encode()).hexdigest()[:10] + str(index)


def _vni(vni: int) -> int:
    if not 1 <= vni <= MAX_VNI:
        raise ExecError(f"VNI {vni} is out of range 1..{MAX_VNI}")
    return vni


def _ipv4(address: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(address)
    except ValueError:
        raise ExecError(f"{what} {address!r} is not an IPv4 address",
                        hint="vmorch's VXLAN underlay is IPv4") from None


@contextlib.contextmanager
def netlink(failed: str) -> Iterator[Any]:
    """An ``IPRoute`` on this network namespace; a refused request becomes an ``ExecError``."""
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop()
        # pyroute2's synchronous API runs an event loop of its own, which can't nest in a running one
        raise ExecError(f"{failed}: called from a coroutine", hint="call it from a thread (asyncio.to_thread)")
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise ExecError(f"{failed}: {os.strerror(exc.code)}", hint="see 'ip -d link' and 'bridge fdb'") from exc


def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def require_link(ipr: Any, name: str, hint: str) -> int:
    index = link_index(ipr, name)
    if index is None:
        raise ExecError(f"no device {name} on this host", hint=hint)
    return index


def run_tool(argv: list[str], failed: str, *, timeout: float = 30, hint: str | None = None) -> str:
    """Run a host tool; its stdout, or an ``ExecError`` with the first line it complained with."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ExecError(f"{failed}: {argv[0]} is not installed", hint=hint) from None
    except subprocess.TimeoutExpired:
        raise ExecError(f"{failed}: {argv[0]} did not finish within {timeout:.0f}s", hint=hint) from None
    if proc.returncode != 0:
        reason = next((line.strip() for line in proc.stderr.splitlines() if line.strip()), f"exit {proc.returncode}")
        raise ExecError(f"{failed}: {reason}", hint=hint)
    return proc.stdout


def disable_ipv6(dev: str) -> None:
    """No IPv6 (so no link-local address) on ``dev``: guests can't reach the host through it."""
    path = Path("/proc/sys/net/ipv6/conf") / dev / "disable_ipv6"
    if path.parent.parent.exists():  # else this kernel has no IPv6 at all
        path.write_text("1")


def _bridge_mac(vni: int, underlay: str) -> str:
    # Without one of its own, a bridge takes the lowest MAC among its ports, so the gateway's MAC
    # would change as VMs come and go. Per host (underlay), so two hosts' bridges never collide.
    digest = hashlib.sha256(f"vmorch/{vni}/{underlay}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _underlay_mtu(ipr: Any, underlay: ipaddress.IPv4Address) -> int:
    for addr in ipr.get_addr(family=socket.AF_INET, address=str(underlay)):
        return int(ipr.link("get", index=addr["index"])[0].get("mtu"))
    raise ExecError(f"underlay address {underlay} is on no interface of this host",
                    hint="give this host's own underlay address (see 'ip -br addr')")


def _replace_unless(ipr: Any, name: str, same: bool) -> bool:
    """Delete ``name`` when it exists but is not what it should be; whether it (still) exists."""
    index = link_index(ipr, name)
    if index is not None and not same:
        ipr.link("del", index=index)
        return False
    return index is not None


def _local_addresses(ipr: Any) -> set[str]:
    return {str(addr.get("address")) for addr in ipr.get_addr(family=socket.AF_INET)}


def _vxlan_matches(ipr: Any, name: str, vni: int, local: ipaddress.IPv4Address) -> bool:
    index = link_index(ipr, name)
    if index is None:
        return False
    link = ipr.link("get", index=index)[0]
    made_from = str(link.get(("linkinfo", "data", "vxlan_local")))
    # Hosts sharing this network namespace (the local cluster) share the segment: one made from another
    # host's address, still here, is kept, else the hosts would take the device from each other in turn.
    return bool(link.get(("linkinfo", "kind")) == "vxlan"
                and link.get(("linkinfo", "data", "vxlan_id")) == vni
                and (made_from == str(local) or made_from in _local_addresses(ipr))
                and link.get(("linkinfo", "data", "vxlan_port")) == VXLAN_PORT
                and link.get(("linkinfo", "data", "vxlan_learning")) == 1)


def _is_bridge(ipr: Any, name: str) -> bool:
    index = link_index(ipr, name)
    return index is not None and ipr.link("get", index=index)[0].get(("linkinfo", "kind")) == "bridge"


def ensure_segment(vni: int, underlay: str, *, mtu: int | None = None) -> None:
    """This host's part of network ``vni``: its bridge, and its VXLAN device from ``underlay``."""
    local = _ipv4(underlay, "underlay address")
    bridge, vxlan = bridge_name(vni), vxlan_name(vni)
    with netlink(f"could not set up {bridge}") as ipr:
        mtu = mtu or _underlay_mtu(ipr, local) - VXLAN_OVERHEAD
        if not _replace_unless(ipr, bridge, _is_bridge(ipr, bridge)):
            ipr.link("add", ifname=bridge, kind="bridge")
        if not _replace_unless(ipr, vxlan, _vxlan_matches(ipr, vxlan, vni, local)):
            ipr.link("add", ifname=vxlan, kind="vxlan", vxlan_id=vni, vxlan_local=str(local),
                     vxlan_port=VXLAN_PORT, vxlan_learning=1)
        bridge_index = require_link(ipr, bridge, "it was removed while being set up; try again")
        vxlan_index = require_link(ipr, vxlan, "it was removed while being set up; try again")
        disable_ipv6(bridge)
        disable_ipv6(vxlan)
        # the isolation rules are in place before either device is up: no frame passes unfiltered
        admit_bridge(bridge)
        made_from = ipr.link("get", index=vxlan_index)[0].get(("linkinfo", "data", "vxlan_local"))
        ipr.link("set", index=bridge_index, address=_bridge_mac(vni, str(made_from)), mtu=mtu)
        ipr.link("set", index=vxlan_index, master=bridge_index, mtu=mtu, state="up")
        ipr.link("set", index=bridge_index, state="up")


def set_peers(vni: int, peers: Collection[str]) -> None:
    """Broadcast and unknown unicast of network ``vni`` go to exactly these hosts (head-end
    replication: one all-zeros FDB entry per peer). An address of this network namespace is never a
    peer: the frames would come back into the bridge they left."""
    wanted = {str(_ipv4(peer, "peer address")) for peer in peers}
    vxlan = vxlan_name(vni)
    with netlink(f"could not set the peers of {vxlan}") as ipr:
        index = require_link(ipr, vxlan, "ensure_segment makes it")
        wanted -= _local_addresses(ipr)
        entries = [(str(e.get("lladdr")), e.get("dst")) for e in ipr.fdb("dump", ifindex=index)
                   if e.get("ifindex") == index and e.get("dst")]
        current = {str(dst) for mac, dst in entries if mac == _ZERO_MAC}
        for dst in sorted(wanted - current):
            ipr.fdb("append", ifindex=index, lladdr=_ZERO_MAC, dst=dst)
        gone = current - wanted
        # MACs learned behind a departed peer would keep their unicast going there until they age out
        for mac, dst in entries:
            if dst in gone:
                with contextlib.suppress(NetlinkError):
                    ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)


def remove_segment(vni: int) -> None:
    bridge, vxlan = bridge_name(vni), vxlan_name(vni)
    with netlink(f"could not remove {bridge}") as ipr:
        for name in (vxlan, bridge):
            index = link_index(ipr, name)
            if index is not None:
                try:
                    ipr.link("del", index=index)
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:  # another host of this namespace removed it first
                        raise
    forget_bridge(bridge)


@dataclass(frozen=True)
class Segment:
    vni: int
    #: the bridge's ports other than its VXLAN device (the VMs' taps)
    ports: tuple[str, ...]
    #: the bridge has an IPv4 address: this host is the network's gateway
    gateway: bool


def segments() -> list[Segment]:
    """Every vmorch bridge in this network namespace."""
    with netlink("could not list network segments") as ipr:
        links = list(ipr.get_links())
        found = []
        for link in links:
            match = _BRIDGE_RE.match(str(link.get("ifname")))
            if match is None or link.get(("linkinfo", "kind")) != "bridge":
                continue
            vni = int(match.group(1))
            ports = sorted(str(port.get("ifname")) for port in links
                           if port.get("master") == link["index"] and port.get("ifname") != vxlan_name(vni))
            gateway = bool(ipr.get_addr(family=socket.AF_INET, index=link["index"]))
            found.append(Segment(vni, tuple(ports), gateway))
    return sorted(found, key=lambda segment: segment.vni)
