"""The gateway of a vmorch network, on the one host that has it: the subnet's first address on the
network's bridge, a DHCP-only dnsmasq bound to that bridge, and optionally NAT out of this host.

dnsmasq daemonizes, so it outlives the worker that started it; a restarted worker finds it again by
its pid file. Its state (pid file, leases) lives in ``state_dir/net-<vni>/``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from orchestrator.model.errors import ExecError

from .netfilter import allow_nat, forget_nat
from .netsegment import bridge_name, netlink, require_link, run_tool

#: DHCP leases; short, so an address of a deleted VM comes back soon
LEASE_TIME = "1h"
#: addresses at the top of a subnet that DHCP never hands out (for static use), when it has room
RESERVED_TOP = 5


def _subnet(subnet: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(subnet)
    except ValueError:
        raise ExecError(f"{subnet!r} is not an IPv4 subnet such as 10.10.0.0/24") from None
    if net.prefixlen > 30:
        raise ExecError(f"subnet {net} is too small: it needs room for a gateway and VMs (at most /30)")
    return net


def _net_dir(vni: int, state_dir: Path) -> Path:
    return state_dir / f"net-{vni}"


def gateway_up(vni: int, subnet: str, *, dhcp: bool, nat: bool, state_dir: Path) -> None:
    """Make this host network ``vni``'s gateway (its segment must exist: ``ensure_segment``)."""
    net = _subnet(subnet)
    bridge = bridge_name(vni)
    gateway = ipaddress.IPv4Interface(f"{net[1]}/{net.prefixlen}")
    with netlink(f"could not put {gateway} on {bridge}") as ipr:
        index = require_link(ipr, bridge, "ensure_segment makes it; call it first")
        _refuse_overlap(ipr, index, net)
        present = {ipaddress.IPv4Interface(f"{a.get('address')}/{a['prefixlen']}")
                   for a in ipr.get_addr(family=socket.AF_INET, index=index)}
        for stale in present - {gateway}:
            ipr.addr("del", index=index, address=str(stale.ip), prefixlen=stale.network.prefixlen)
        if gateway not in present:
            ipr.addr("add", index=index, address=str(gateway.ip), prefixlen=net.prefixlen)
    if nat:
        allow_nat(bridge, net)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")  # never turned off again: others may need it
    else:
        forget_nat(bridge)
    directory = _net_dir(vni, state_dir)
    if dhcp:
        directory.mkdir(parents=True, exist_ok=True)
        _ensure_dnsmasq(bridge, _dnsmasq_argv(bridge, net, nat=nat, directory=directory), directory)
    else:
        _stop_dnsmasq(directory)


def _refuse_overlap(ipr: Any, own_index: int, net: ipaddress.IPv4Network) -> None:
    for addr in ipr.get_addr(family=socket.AF_INET):
        if addr["index"] == own_index:
            continue
        other = ipaddress.IPv4Interface(f"{addr.get('address')}/{addr['prefixlen']}")
        if other.network.overlaps(net):
            raise ExecError(f"subnet {net} overlaps {other} on {addr.get('label')} of this host",
                            hint="give the network a subnet that no host of its gateway uses")


def gateway_down(vni: int, state_dir: Path) -> None:
    """Undo ``gateway_up``: dnsmasq stopped, address and NAT gone, state removed."""
    bridge = bridge_name(vni)
    directory = _net_dir(vni, state_dir)
    _stop_dnsmasq(directory)
    with netlink(f"could not remove the gateway address of {bridge}") as ipr:
        index = ipr.link_lookup(ifname=bridge)
        for addr in ipr.get_addr(family=socket.AF_INET, index=index[0]) if index else ():
            ipr.addr("del", index=index[0], address=addr.get("address"), prefixlen=addr["prefixlen"])
    forget_nat(bridge)
    shutil.rmtree(directory, ignore_errors=True)


def leases(vni: int, state_dir: Path) -> dict[str, str]:
    """MAC (lowercase) -> IPv4 address, of the unexpired leases of network ``vni``'s dnsmasq."""
    try:
        text = (_net_dir(vni, state_dir) / "leases").read_text()
    except FileNotFoundError:
        return {}
    now = time.time()
    found: dict[str, str] = {}
    for line in text.splitlines():
        # "<expiry epoch, 0 = never> <mac> <ip> <hostname> <client id>"
        fields = line.split()
        if len(fields) >= 3 and fields[0].isdigit() and (int(fields[0]) == 0 or int(fields[0]) > now):
            found[fields[1].lower()] = fields[2]
    return found


# -- dnsmasq --------------------------------------------------------------------------------------


def _dnsmasq_argv(bridge: str, net: ipaddress.IPv4Network, *, nat: bool, directory: Path) -> list[str]:
    exe = shutil.which("dnsmasq")
    if exe is None:
        raise ExecError("dnsmasq is not installed on this host", hint="apt-get install dnsmasq-base")
    hosts = net.num_addresses - 2
    first, last = net[2], net[-2] - (RESERVED_TOP if hosts >= 4 * RESERVED_TOP else 0)
    return [
        exe,
        "--conf-file=/dev/null",  # nothing from /etc/dnsmasq.conf
        "--port=0",  # no DNS server at all: DHCP only
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",  # with one --interface: SO_BINDTODEVICE, so one dnsmasq per bridge can coexist
        f"--interface={bridge}",
        "--except-interface=lo",
        f"--pid-file={directory / 'dnsmasq.pid'}",
        f"--dhcp-leasefile={directory / 'leases'}",
        f"--dhcp-range={first},{last},{net.netmask},{LEASE_TIME}",
        "--dhcp-authoritative",
        "--no-ping",  # the host can't ping into the network anyway (its replies are dropped): don't wait
        # an option given without a value is never sent: no router unless NAT, never a DNS server
        f"--dhcp-option=option:router,{net[1]}" if nat else "--dhcp-option=option:router",
        "--dhcp-option=option:dns-server",
    ]


def _read_pid(directory: Path) -> int | None:
    try:
        return int((directory / "dnsmasq.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return raw.decode(errors="replace").rstrip("\0").split("\0")


def _our_dnsmasq(directory: Path) -> tuple[int, list[str]] | None:
    """The live dnsmasq of ``directory`` (pid and argv), if any: a pid that was reused by another
    process, or a zombie, doesn't count."""
    pid = _read_pid(directory)
    if pid is None:
        return None
    argv = _cmdline(pid)
    if f"--pid-file={directory / 'dnsmasq.pid'}" not in argv:
        return None
    return pid, argv


def _ensure_dnsmasq(bridge: str, argv: list[str], directory: Path) -> None:
    running = _our_dnsmasq(directory)
    if running is not None and running[1] == argv:
        return
    _stop_dnsmasq(directory)
    # dnsmasq forks into the background once its sockets are bound: a non-zero exit is a real failure
    run_tool(argv, f"dnsmasq did not start on {bridge}", timeout=20,
             hint="is another DHCP server bound to this bridge?")


def _stop_dnsmasq(directory: Path) -> None:
    running = _our_dnsmasq(directory)
    if running is not None:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(running[0], sig)
            deadline = time.monotonic() + grace
            while _cmdline(running[0]) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not _cmdline(running[0]):
                break
        else:
            raise ExecError(f"dnsmasq (pid {running[0]}) did not stop", hint="look at it with 'ps' and stop it")
    with contextlib.suppress(FileNotFoundError):
        (directory / "dnsmasq.pid").unlink()
