"""worker.netdev, netgateway, netshape and netfilter against the real kernel, in network namespaces
(tests/netns.py): two hosts joined by an underlay, fake VMs on their bridges.

The library acts on the network namespace of its caller, so every call runs in a host namespace
through ``ip netns exec ... python`` (``call``); nothing here touches the root namespace's links.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker import netfilter

from .netns import OUTSIDE_ADDR, FakeVm, Underlay, exec_argv

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("ip", "nft", "tc", "dnsmasq", "tcpdump")),
                       reason="needs iproute2, nftables, dnsmasq-base and tcpdump"),
]

_PRELUDE = """\
import dataclasses, json, sys, time
from pathlib import Path
from worker import netdev, netfilter
from orchestrator.model.errors import ExecError
try:
    value = {expr}
    print(json.dumps({{"value": value}}, default=list))
except ExecError as exc:
    print(json.dumps({{"error": exc.message, "hint": exc.hint}}))
"""


class Refused(Exception):
    """The library raised ExecError inside the namespace."""

    def __init__(self, message: str, hint: str | None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


def call(ns: str, expr: str, *, timeout: float = 60) -> Any:
    """Evaluate ``expr`` with the network modules imported, inside ``ns``; its value (through JSON)."""
    proc = subprocess.run(exec_argv(ns, [PYTHON, "-c", _PRELUDE.format(expr=expr)]), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{expr} in {ns} failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in out:
        raise Refused(out["error"], out["hint"])
    return out["value"]


def segment(u: Underlay, vni: int, hosts: list[int]) -> None:
    """Network ``vni`` on these hosts, each peering with the others."""
    for i in hosts:
        call(u.host_ns(i), f"netdev.ensure_segment({vni}, {u.host_addr(i)!r})")
    for i in hosts:
        call(u.host_ns(i), f"netdev.set_peers({vni}, {[u.host_addr(j) for j in hosts]!r})")


def links(ns: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(subprocess.run(["ip", "-n", ns, "-j", "-d", "link", "show"],
                                                            capture_output=True, text=True, timeout=10).stdout)
    return found


def vmorch_links(ns: str) -> list[str]:
    return sorted(link["ifname"] for link in links(ns) if re.match(r"^(vmbr|vmvx|vmpr)", link["ifname"]))


def nft_elements(ns: str) -> list[str]:
    sets: list[str] = call(ns, "[netfilter.elements_of(f'vmbr{n}') for n in (100, 200, 300, 301, 302, 303)]")
    return [element for per_bridge in sets for element in per_bridge]


def pids_of(ns: str, command: str = "dnsmasq") -> list[int]:
    found = []
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                found.append(int(pid))
        except FileNotFoundError:
            continue
    return found


def rtt_avg_ms(vm: FakeVm, address: str) -> float:
    proc = vm.run(["ping", "-n", "-q", "-c", "20", "-i", "0.01", "-s", "1400", "-W", "2", address], timeout=30)
    match = re.search(r"= [\d.]+/([\d.]+)/", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


def tcp_connects(vm: FakeVm, address: str, port: int) -> str:
    code = (f"import socket\ntry:\n    socket.create_connection(({address!r}, {port}), timeout=2); print('connected')\n"
            "except TimeoutError: print('timeout')\nexcept OSError as e: print(type(e).__name__)")
    return vm.run([PYTHON, "-c", code], timeout=15).stdout.strip()


@pytest.fixture
def underlay() -> Iterator[Underlay]:
    with Underlay(hosts=2) as u:
        yield u


def test_vxlan_carries_a_network_across_hosts_and_networks_stay_apart(underlay: Underlay) -> None:
    u = underlay
    segment(u, 100, [0, 1])
    a = u.fake_vm(0, "vmbr100", address="10.77.0.10/24")
    u.fake_vm(1, "vmbr100", address="10.77.0.11/24")
    a2 = u.fake_vm(0, "vmbr100", address="10.77.0.12/24")
    assert a.ping("10.77.0.11"), "across hosts, through VXLAN"
    assert a2.ping("10.77.0.10"), "two VMs on one host"
    by_name = {link["ifname"]: link for link in links(u.host_ns(0))}
    assert by_name["vmbr100"]["mtu"] == by_name["vmvx100"]["mtu"] == 1500 - 50
    assert by_name["vmvx100"]["master"] == "vmbr100"
    assert "inet6" not in subprocess.run(["ip", "-n", u.host_ns(0), "addr", "show", "vmbr100"],
                                         capture_output=True, text=True, timeout=10).stdout

    # the same subnet on another network: not one packet gets from one to the other
    segment(u, 200, [0, 1])
    c = u.fake_vm(1, "vmbr200", address="10.77.0.20/24")
    assert not c.ping("10.77.0.10") and not c.ping("10.77.0.11")

    assert call(u.host_ns(0), "[dataclasses.asdict(s) for s in netdev.segments()]") == [
        {"vni": 100, "ports": sorted([a.port, a2.port]), "gateway": False},
        {"vni": 200, "ports": [], "gateway": False},
    ]

    # a crash left half a segment: the next call makes it whole again
    subprocess.run(["ip", "-n", u.host_ns(1), "link", "del", "vmvx100"], check=True, timeout=10)
    segment(u, 100, [0, 1])
    segment(u, 100, [0, 1])
    assert a.ping("10.77.0.11")

    # without peers nothing crosses; own address is never a peer
    for i in (0, 1):
        call(u.host_ns(i), f"netdev.set_peers(100, [{u.host_addr(i)!r}])")
    fdb = subprocess.run(["bridge", "-n", u.host_ns(0), "fdb", "show", "dev", "vmvx100"], capture_output=True,
                         text=True, timeout=10).stdout
    assert "dst" not in fdb
    assert not a.ping("10.77.0.11")
    segment(u, 100, [0, 1])
    assert a.ping("10.77.0.11")

    for i in (0, 1):
        for vni in (100, 200):
            call(u.host_ns(i), f"netdev.remove_segment({vni})")
        call(u.host_ns(i), "netdev.remove_segment(100)")
        assert vmorch_links(u.host_ns(i)) == []
        assert nft_elements(u.host_ns(i)) == []
        assert call(u.host_ns(i), "netdev.segments()") == []


def udhcpc(vm: FakeVm, tmp_path: Path) -> dict[str, str]:
    """What a DHCP client on ``vm`` is offered (its own script: the stock one would write the host's
    /etc/resolv.conf)."""
    out = tmp_path / f"dhcp-{vm.ns}.env"
    script = tmp_path / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] || exit 0\n'
                      f'printf "ip=%s\\nmask=%s\\nrouter=%s\\ndns=%s\\n" "$ip" "$mask" "$router" "$dns" > {out}\n')
    script.chmod(0o755)
    out.unlink(missing_ok=True)
    proc = vm.run(["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-A", "1", "-s", str(script)],
                  timeout=30)
    assert out.exists(), f"no DHCP lease: {proc.stdout} {proc.stderr}"
    return dict(line.split("=", 1) for line in out.read_text().splitlines())


@pytest.mark.skipif(shutil.which("udhcpc") is None, reason="needs udhcpc (Debian package udhcpc)")
def test_gateway_gives_dhcp_keeps_the_host_out_and_nats_only_when_asked(underlay: Underlay, tmp_path: Path) -> None:
    u, h0, state = underlay, underlay.host_ns(0), tmp_path / "state"
    segment(u, 100, [0, 1])
    call(h0, f"netdev.gateway_up(100, '10.77.0.0/24', dhcp=True, nat=False, state_dir=Path({str(state)!r}))")
    assert call(h0, "[s.gateway for s in netdev.segments()]") == [True]

    vm = u.fake_vm(1, "vmbr100")  # on the other host: DHCP crosses VXLAN
    offer = udhcpc(vm, tmp_path)
    assert offer["ip"].startswith("10.77.0.") and offer["mask"] == "24"
    assert offer["router"] == "" and offer["dns"] == "", "no router without NAT, never a DNS server"
    assert call(h0, f"netdev.leases(100, Path({str(state)!r}))") == {vm.mac: offer["ip"]}
    assert call(u.host_ns(1), f"netdev.leases(100, Path({str(tmp_path / 'none')!r}))") == {}
    subprocess.run(vm.exec_argv(["ip", "addr", "add", f"{offer['ip']}/24", "dev", "eth0"]), check=True, timeout=10)
    subprocess.run(vm.exec_argv(["ip", "route", "add", "default", "via", "10.77.0.1"]), check=True, timeout=10)

    # the host: neither its gateway address nor any other answers, but a server there listens
    server = subprocess.Popen(exec_argv(h0, [PYTHON, "-c", "import socket,time\ns=socket.create_server(('0.0.0.0', "
                                              "7777))\nprint('up', flush=True)\ntime.sleep(120)"]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        assert subprocess.run(exec_argv(h0, [PYTHON, "-c", "import socket; socket.create_connection(('10.77.0.1',"
                                                           " 7777), timeout=2)"]), timeout=15).returncode == 0
        assert tcp_connects(vm, "10.77.0.1", 7777) == "timeout"
        assert tcp_connects(vm, u.host_addr(0), 7777) == "timeout"
        assert not vm.ping("10.77.0.1") and not vm.ping(u.host_addr(0))
        assert not vm.ping(OUTSIDE_ADDR), "no NAT asked"

        call(h0, f"netdev.gateway_up(100, '10.77.0.0/24', dhcp=True, nat=True, state_dir=Path({str(state)!r}))")
        assert vm.ping(OUTSIDE_ADDR), "NAT out through the gateway host"
        assert udhcpc(vm, tmp_path)["router"] == "10.77.0.1"
        assert tcp_connects(vm, "10.77.0.1", 7777) == "timeout", "NAT lets the network out, not into the host"
    finally:
        server.kill()
        server.communicate(timeout=10)

    # a second NAT network on the same gateway host: out yes, into the first network no
    segment(u, 200, [0, 1])
    call(h0, f"netdev.gateway_up(200, '10.78.0.0/24', dhcp=False, nat=True, state_dir=Path({str(state)!r}))")
    other = u.fake_vm(1, "vmbr200", address="10.78.0.10/24", gateway="10.78.0.1")
    assert other.ping(OUTSIDE_ADDR)
    assert not other.ping(offer["ip"]) and not vm.ping("10.78.0.10")

    # a running dnsmasq is left alone, a dead one started again; it outlives the process that started it
    pid_file = state / "net-100" / "dnsmasq.pid"
    pid = int(pid_file.read_text())
    assert pids_of(h0) == [pid]
    call(h0, f"netdev.gateway_up(100, '10.77.0.0/24', dhcp=True, nat=True, state_dir=Path({str(state)!r}))")
    assert int(pid_file.read_text()) == pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids_of(h0) and time.monotonic() < deadline:
        time.sleep(0.05)
    call(h0, f"netdev.gateway_up(100, '10.77.0.0/24', dhcp=True, nat=True, state_dir=Path({str(state)!r}))")
    assert pids_of(h0) == [int(pid_file.read_text())] != [pid]

    for _ in range(2):
        for vni in (100, 200):
            call(h0, f"netdev.gateway_down({vni}, Path({str(state)!r}))")
    assert pids_of(h0) == []
    assert not (state / "net-100").exists()
    assert "inet " not in subprocess.run(["ip", "-n", h0, "addr", "show", "vmbr100"], capture_output=True,
                                         text=True, timeout=10).stdout
    assert [e for e in nft_elements(h0) if not e.startswith("intra ")] == []
    assert not vm.ping(OUTSIDE_ADDR)
    for i in (0, 1):
        for vni in (100, 200):
            call(u.host_ns(i), f"netdev.remove_segment({vni})")
        assert vmorch_links(u.host_ns(i)) == [] and nft_elements(u.host_ns(i)) == []


def test_hosts_sharing_a_namespace_share_the_table_and_segments(underlay: Underlay) -> None:
    """Several hosts in one network namespace (the local cluster): they may make the shared table at the
    same moment, and they share each network's segment instead of taking it from each other."""
    h0 = underlay.host_ns(0)
    code = _PRELUDE.format(expr="netdev.ensure_segment(int(sys.argv[1]), '198.18.0.10')")
    procs = [subprocess.Popen(exec_argv(h0, [PYTHON, "-c", code, str(vni)]), cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for vni in (300, 301, 302, 303)]
    outputs = [json.loads(proc.communicate(timeout=60)[0]) for proc in procs]
    assert outputs == [{"value": None}] * 4
    table = json.loads(subprocess.run(exec_argv(h0, ["nft", "-j", "list", "table", "inet", "vmorch"]),
                                      capture_output=True, text=True, timeout=10, check=True).stdout)
    rules = [obj for obj in table["nftables"] if "rule" in obj]
    assert len(rules) == netfilter._RULES.count("add rule")
    assert sorted(nft_elements(h0)) == sorted(f'intra "vmbr{n}" . "vmbr{n}"' for n in (300, 301, 302, 303))

    # a second host in this namespace, with an underlay address of its own, shares the segments
    subprocess.run(["ip", "-n", h0, "addr", "add", "198.18.0.50/24", "dev", "ul0"], check=True, timeout=10)
    made = {link["ifname"]: link["ifindex"] for link in links(h0)}
    call(h0, "netdev.ensure_segment(300, '198.18.0.50')")
    call(h0, "netdev.set_peers(300, ['198.18.0.10', '198.18.0.50', '198.18.0.11'])")
    assert {link["ifname"]: link["ifindex"] for link in links(h0)} == made
    fdb = subprocess.run(["bridge", "-n", h0, "fdb", "show", "dev", "vmvx300"], capture_output=True, text=True,
                         timeout=10).stdout
    assert re.findall(r"dst (\S+)", fdb) == ["198.18.0.11"], fdb
    for vni in (300, 301, 302, 303, 300):
        call(h0, f"netdev.remove_segment({vni})")
    assert vmorch_links(h0) == [] and nft_elements(h0) == []


def test_rate_shaping_slows_the_traffic_towards_a_vm(underlay: Underlay) -> None:
    u, h0 = underlay, underlay.host_ns(0)
    segment(u, 100, [0])
    a = u.fake_vm(0, "vmbr100", address="10.77.0.10/24")
    b = u.fake_vm(0, "vmbr100", address="10.77.0.11/24")
    assert "rate" in call(h0, "sorted(netdev.shaping_support())")
    assert vmorch_links(h0) == ["vmbr100", "vmvx100"], "the probe's veth pair is gone"
    before = rtt_avg_ms(a, "10.77.0.11")
    call(h0, f"netdev.shape({b.port!r}, rate_kbit=256)")
    shaped = rtt_avg_ms(a, "10.77.0.11")
    assert shaped > before + 10, (before, shaped)
    for _ in range(2):
        call(h0, f"netdev.shape({b.port!r})")
    qdiscs = subprocess.run(["tc", "-n", h0, "qdisc", "show", "dev", b.port], capture_output=True, text=True,
                            timeout=10).stdout
    assert "tbf" not in qdiscs and "netem" not in qdiscs
    assert rtt_avg_ms(a, "10.77.0.11") < before + 10
    with pytest.raises(Refused, match="no device"):
        call(h0, "netdev.shape('nosuchdev', rate_kbit=100)")


def test_delay_and_loss(underlay: Underlay) -> None:
    u, h0 = underlay, underlay.host_ns(0)
    segment(u, 100, [0])
    a = u.fake_vm(0, "vmbr100", address="10.77.0.10/24")
    b = u.fake_vm(0, "vmbr100", address="10.77.0.11/24")
    if "delay" not in call(h0, "sorted(netdev.shaping_support())"):
        for kwargs in ("delay_ms=50", "loss_pct=10", "delay_ms=5, rate_kbit=100"):
            with pytest.raises(Refused) as refused:
                call(h0, f"netdev.shape({b.port!r}, {kwargs})")
            assert "has no netem qdisc (CONFIG_NET_SCH_NETEM)" in refused.value.message
            assert refused.value.hint
        pytest.skip("this kernel has no netem: only the refusal of --delay and --loss is tested")
    call(h0, f"netdev.shape({b.port!r}, delay_ms=50)")
    assert rtt_avg_ms(a, "10.77.0.11") > 45
    call(h0, f"netdev.shape({b.port!r}, loss_pct=100)")
    assert not a.ping("10.77.0.11")
    call(h0, f"netdev.shape({b.port!r})")
    assert a.ping("10.77.0.11")


def pcap_records(data: bytes) -> list[bytes]:
    magic = struct.unpack_from("<I", data)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), hex(magic)
    records, offset = [], 24
    while offset < len(data):
        caplen = struct.unpack_from("<I", data, offset + 8)[0]
        records.append(data[offset + 16: offset + 16 + caplen])
        offset += 16 + caplen
    assert offset == len(data), "whole records only"
    return records


def is_icmp(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[23] == 1


def test_capture_returns_a_pcap_of_what_crossed_the_port(underlay: Underlay, tmp_path: Path) -> None:
    u, h0 = underlay, underlay.host_ns(0)
    segment(u, 100, [0])
    a = u.fake_vm(0, "vmbr100", address="10.77.0.10/24")
    b = u.fake_vm(0, "vmbr100", address="10.77.0.11/24")
    out = tmp_path / "capture.pcap"
    expr = f"Path({str(out)!r}).write_bytes(netdev.capture({b.port!r}, seconds=4, max_bytes=1_000_000)) and None"
    code = _PRELUDE.format(expr=expr)
    started = time.monotonic()
    proc = subprocess.Popen(exec_argv(h0, [PYTHON, "-c", code]), cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(1.5)  # tcpdump is listening by then
    assert a.ping("10.77.0.11", count=3)
    assert json.loads(proc.communicate(timeout=30)[0]) == {"value": None}
    assert time.monotonic() - started < 10
    records = pcap_records(out.read_bytes())
    assert sum(is_icmp(frame) for frame in records) >= 6, "3 requests and 3 replies"
    shown = subprocess.run(["tcpdump", "-n", "-r", str(out), "icmp"], capture_output=True, text=True, timeout=10)
    assert "ICMP echo request" in shown.stdout

    # the limits: packets, bytes (a valid pcap with no packet at all), time
    ping = subprocess.Popen(a.exec_argv(["ping", "-n", "-q", "-c", "40", "-i", "0.05", "-s", "500", "10.77.0.11"]),
                            stdout=subprocess.DEVNULL)
    try:
        two = call(h0, f"list(netdev.capture({b.port!r}, seconds=3, max_bytes=1_000_000, max_packets=2))")
        assert len(pcap_records(bytes(two))) == 2
        cut = bytes(call(h0, f"list(netdev.capture({b.port!r}, seconds=3, max_bytes=500))"))
        # no 542-byte ping frame fits in 500 bytes; a small ARP exchange may (the machine's load decides)
        assert 24 <= len(cut) <= 500 and not any(is_icmp(frame) for frame in pcap_records(cut)), cut
    finally:
        ping.kill()
        ping.wait(timeout=10)
    started = time.monotonic()
    assert len(call(h0, f"list(netdev.capture({b.port!r}, seconds=1, max_bytes=10_000))")) >= 24
    assert time.monotonic() - started < 6
    assert pids_of(h0, "tcpdump") == []
