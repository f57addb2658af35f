"""Networks with real guests on two hosts whose underlays are real: each host's worker runs in its own
network namespace, joined to the others by veths on a test bridge (``tests/netns.py``), so VXLAN really
crosses "hosts". Everything stays on this machine: no namespace here has a default route, the NAT
target is a listener in another test-owned namespace, dnsmasq forwards no DNS, every ping is bounded.

One topology for the module (booting guests under TCG is the cost):

    namespace A, network lan (10.10.0.0/24, DHCP, NAT, gateway on h0):  a1 on h0, a3 on h0, a2 on h1
    namespace B, network lan (10.10.0.0/24, no DHCP):                    b1 on h1 (10.10.0.250, static)
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from orchestrator.model.network import NetworkSpec
from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import JobState, Vm
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import PYTHON, ROOT, RedisServer, WorkerProc, free_port, settings_env, wait_hosts_up, wait_until
from .helpers import qemu_pids
from .netns import OUTSIDE_ADDR, ROOT_ADDR, Underlay

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces, bridges and VXLAN need root")
SUBNET = "10.10.0.0/24"


@dataclass
class Topology:
    underlay: Underlay
    settings: Settings
    a: RedisClient
    b: RedisClient
    redis: Redis
    workers: list[WorkerProc]
    roots: list[Path]
    hosts: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    def exec(self, client: RedisClient, vm: str, *argv: str, timeout: float = 30) -> dict[str, Any]:
        ns = client.settings.namespace
        [job] = client.wait([j.id for j in client.submit(
            [Operation.build(Op.EXEC, ns, vm, command=list(argv), timeout_s=timeout)])], timeout=timeout + 60)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.result is not None
        return job.result

    def ping(self, client: RedisClient, vm: str, address: str, *, size: int = 56, count: int = 1) -> dict[str, Any]:
        return self.exec(client, vm, "ping", "-c", str(count), "-W", "2", "-s", str(size), address,
                         timeout=10 + 3 * count)

    def ip_of(self, client: RedisClient, vm: str, timeout: float = 120) -> str:
        found: list[str] = []

        def has_ip() -> bool:
            nic = client.vm(client.settings.namespace, vm).nics[0]
            if nic.ip:
                found.append(nic.ip)
            return bool(nic.ip)

        wait_until(has_ip, timeout=timeout, interval=0.5, what=f"{vm}'s DHCP address")
        return found[-1]

    def links(self, host: int) -> str:
        return self.underlay.run(self.underlay.host_ns(host), ["ip", "-o", "link", "show"]).stdout


def _rtt_ms(stdout: str) -> float:
    """The round trip of a busybox ping's reply line (``time=1.234 ms``)."""
    for line in stdout.splitlines():
        if "time=" in line:
            return float(line.split("time=", 1)[1].split()[0])
    raise AssertionError(f"no reply in:\n{stdout}")


def _start_worker(settings: Settings, underlay: Underlay, i: int, host: str, root: Path) -> WorkerProc:
    log = settings.home / f"{host}.log"
    uri = f"qemu:///embed?root={root}"
    argv = [PYTHON, "-m", "worker", "--host", host, "--libvirt-uri", uri, "--concurrency", "3",
            "--underlay", underlay.host_addr(i)]
    with log.open("wb") as out:
        # 'ip netns exec' execs the worker: the PID it gives is the worker's own, to stop it by
        proc = subprocess.Popen(underlay.exec_argv(underlay.host_ns(i), argv), cwd=ROOT, env=settings_env(settings),
                                stdout=out, stderr=subprocess.STDOUT)
    return WorkerProc(host, uri, proc, log)


class _Listener:
    """tcpdump in the outside namespace: the ICMP echo requests that reach it, and from which address."""

    def __init__(self, underlay: Underlay) -> None:
        argv = ["tcpdump", "-i", "ul0", "-n", "-l", "-c", "20", "icmp and icmp[icmptype] = icmp-echo"]
        self.proc = subprocess.Popen(underlay.exec_argv(underlay.outside_ns, argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        said = [self.proc.stderr.readline() for _ in range(2)]  # a notice, then "listening on": capturing
        if not any("listening on" in line for line in said):
            self.stop()
            raise AssertionError(f"tcpdump did not start: {said}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def sources(self) -> list[str]:
        return [line.split(" IP ", 1)[1].split(" > ", 1)[0] for line in self.lines if " IP " in line]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def topo(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("netguests")
    with Underlay(hosts=2) as underlay:
        redis_server = RedisServer(free_port(), tmp / "redis",
                                   extra=("--bind", "127.0.0.1", ROOT_ADDR, "--protected-mode", "no"))
        redis_server.start()
        url = f"redis://{ROOT_ADDR}:{redis_server.port}/0"
        home = tmp / "home"
        home.mkdir()
        settings = Settings(redis_url=url, home=home, lock_expire=4, heartbeat_interval=0.5, host_down_after=3.0,
                            host_down_deadline=4.0, wait_poll_interval=0.5)
        hosts = [f"nh{os.getpid() % 1000}a", f"nh{os.getpid() % 1000}b"]
        roots = [tmp / f"root{i}" for i in range(2)]
        workers: list[WorkerProc] = []
        redis = Redis.from_url(url, decode_responses=True)
        try:
            for i, host in enumerate(hosts):
                roots[i].mkdir()
                workers.append(_start_worker(settings, underlay, i, host, roots[i]))
            wait_hosts_up(settings, *workers, timeout=120)
            a = RedisClient(settings.model_copy(update={"namespace": "neta"}))
            b = RedisClient(settings.model_copy(update={"namespace": "netb"}))
            jobs = a.import_image("guest", f"file://{guest_image}", hosts=hosts)
            assert all(j.state is JobState.SUCCEEDED for j in a.wait([j.id for j in jobs], timeout=180))
            topo = Topology(underlay, settings, a, b, redis, workers, roots, hosts)
            yield topo
            _teardown(topo)
        finally:
            for w in workers:
                w.stop()
            leftover = [pid for root in roots for pid in qemu_pids(root)]
            for pid in leftover:
                os.kill(pid, signal.SIGKILL)
            redis.close()
            redis_server.stop()
            assert not leftover, f"QEMU processes outlived the test: {leftover}"


def _teardown(t: Topology) -> None:
    for client in (t.a, t.b):
        ns = client.settings.namespace
        names = client.store.vm_names(ns)
        if names:
            done = client.wait([j.id for j in client.submit([Operation.build(Op.DELETE, ns, n) for n in names])],
                               timeout=120)
            assert all(j.state is JobState.SUCCEEDED for j in done), [j.error for j in done]
        for net in client.networks(ns):
            client.delete_network(ns, net.name)
            client.wait_network(ns, net.name, gone=True, timeout=60)
    removed = t.a.wait([j.id for j in t.a.remove_image("guest")], timeout=60)
    assert all(j.state is JobState.SUCCEEDED for j in removed)
    for i in range(2):  # every bridge and VXLAN device, and every dnsmasq, gone with the networks
        wait_until(lambda i=i: "vmbr" not in t.links(i) and "vmvx" not in t.links(i), timeout=30,
                   what=f"host {i}'s bridges gone")
        ps = t.underlay.run(t.underlay.host_ns(i), ["ip", "netns", "pids", t.underlay.host_ns(i)]).stdout.split()
        names = [Path(f"/proc/{p}/comm").read_text().strip() for p in ps if Path(f"/proc/{p}/comm").exists()]
        assert "dnsmasq" not in names, names


def _launch(client: RedisClient, *vms: tuple[str, str, str]) -> None:
    ns = client.settings.namespace
    ops = [Operation.build(Op.LAUNCH, ns, name, image="guest", disk_gib=1, memory_mib=160, host=host, nets=[net])
           for name, host, net in vms]
    done = client.wait([j.id for j in client.submit(ops)], timeout=240)
    assert all(j.state is JobState.SUCCEEDED for j in done), [j.error for j in done]


def test_guests_on_two_hosts_share_one_segment_with_dhcp_and_nothing_else_reaches_them(topo: Topology) -> None:
    t = topo
    h0, h1 = t.hosts
    start = time.monotonic()
    t.a.create_network("neta", NetworkSpec(name="lan", subnet=SUBNET, nat=True, host=h0))
    t.a.wait_network("neta", "lan", gone=False, timeout=60)
    t.timings["network ready (gateway host)"] = time.monotonic() - start
    t.b.create_network("netb", NetworkSpec(name="lan", subnet=SUBNET, dhcp=False))
    _launch(t.a, ("a1", h0, "lan"), ("a3", h0, "lan"), ("a2", h1, "lan"))
    _launch(t.b, ("b1", h1, "lan"))
    vni_a = t.a.network("neta", "lan").vni
    vni_b = t.b.network("netb", "lan").vni
    assert vni_a != vni_b
    assert f"vmbr{vni_a}" in t.links(1) and f"vmvx{vni_a}" in t.links(1)  # made on h1 with its first VM
    ips = {vm: t.ip_of(t.a, vm) for vm in ("a1", "a2", "a3")}
    assert all(ip.startswith("10.10.0.") for ip in ips.values()) and len(set(ips.values())) == 3
    shown: Vm = t.a.vm("neta", "a2")
    assert shown.nics[0].net == "lan" and shown.nics[0].ip == ips["a2"]
    # across hosts, and on one host (the first ping may wait for ARP: a few tries, bounded)
    for src, dst in (("a1", "a2"), ("a2", "a1"), ("a1", "a3")):
        wait_until(lambda s=src, d=dst: t.ping(t.a, s, ips[d])["exit_code"] == 0, timeout=60, interval=1,
                   what=f"{src} pings {dst}")
    across = [_rtt_ms(t.ping(t.a, "a1", ips["a2"])["stdout"]) for _ in range(5)]
    local = [_rtt_ms(t.ping(t.a, "a1", ips["a3"])["stdout"]) for _ in range(5)]
    t.timings["ping rtt across hosts, median ms"] = sorted(across)[2]
    t.timings["ping rtt one host, median ms"] = sorted(local)[2]
    # namespace B's network has the same subnet, and is another segment: b1 reaches none of them
    t.exec(t.b, "b1", "sh", "-c", "kill $(cat /run/udhcpc.eth0.pid) 2>/dev/null; "
                                  "ip addr add 10.10.0.250/24 dev eth0; ip link set eth0 up")
    for dst in ("a1", "a2", "a3"):
        assert t.ping(t.b, "b1", ips[dst], count=2)["exit_code"] != 0, f"b1 reached {dst}"
        assert t.ping(t.a, dst, "10.10.0.250", count=2)["exit_code"] != 0, f"{dst} reached b1"
    # the host: its gateway address answers DHCP only; its underlay address not at all
    gw = t.a.network("neta", "lan").gateway
    assert t.ping(t.a, "a2", gw, count=2)["exit_code"] != 0, "a guest pinged its gateway host"
    assert t.ping(t.a, "a2", t.underlay.host_addr(0), count=2)["exit_code"] != 0, "a guest reached h0 itself"


def test_nat_reaches_an_outside_listener_through_the_gateway_host(topo: Topology) -> None:
    t = topo
    listener = _Listener(t.underlay)
    try:
        assert t.ping(t.a, "a2", OUTSIDE_ADDR, count=2)["exit_code"] == 0
        wait_until(lambda: bool(listener.sources()), timeout=10, what="the outside saw the pings")
        # masqueraded by the gateway host (h0): the outside sees its underlay address, not the guest's
        assert set(listener.sources()) == {t.underlay.host_addr(0)}, listener.lines
        # namespace B's network has no NAT (and no route out): b1 can't
        seen = len(listener.lines)
        assert t.ping(t.b, "b1", OUTSIDE_ADDR, count=2)["exit_code"] != 0
        assert len(listener.lines) == seen, listener.lines
    finally:
        listener.stop()


def test_a_capture_shows_the_pings(topo: Topology, tmp_path: Path) -> None:
    t = topo
    ips = {vm: t.ip_of(t.a, vm) for vm in ("a1", "a2")}
    out: list[bytes] = []
    capture = threading.Thread(target=lambda: out.append(t.a.capture("neta", "lan", vm="a2", seconds=6)))
    capture.start()
    time.sleep(2)  # tcpdump starts on a2's host first (bounded: the capture lasts 6 s)
    assert t.ping(t.a, "a1", ips["a2"], count=3)["exit_code"] == 0
    capture.join(timeout=60)
    assert out, "no capture came back"
    pcap = tmp_path / "lan.pcap"
    pcap.write_bytes(out[0])
    text = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True, timeout=30).stdout
    requests = [line for line in text.splitlines() if f"{ips['a1']} > {ips['a2']}: ICMP echo request" in line]
    replies = [line for line in text.splitlines() if f"{ips['a2']} > {ips['a1']}: ICMP echo reply" in line]
    assert len(requests) >= 3 and len(replies) >= 3, text


def test_link_emulation_is_an_ordered_job_and_shows_in_ping_times(topo: Topology) -> None:
    t = topo
    ips = {vm: t.ip_of(t.a, vm) for vm in ("a1", "a2")}
    burst = f"for i in 1 2 3 4 5 6 7 8; do ping -c 1 -W 5 -s 1400 {ips['a2']} & done; wait"

    def fast_replies() -> int:
        """Of 8 pings of 1428 bytes sent at once, the replies back within 50 ms (at 100 kbit/s one such
        packet takes ~115 ms on the wire towards a2: they queue, or are dropped past tbf's latency)."""
        out = t.exec(t.a, "a1", "sh", "-c", burst, timeout=30)["stdout"]
        return sum(float(line.split("time=", 1)[1].split()[0]) < 50 for line in out.splitlines() if "time=" in line)

    assert fast_replies() >= 6
    h1 = t.a.store.host(t.hosts[1])
    if "delay" in h1.shaping.split(","):
        [job] = t.a.wait([j.id for j in t.a.submit([Operation.build(
            Op.SET, "neta", "a2", nic=0, shaping={"delay_ms": 50})])], timeout=60)
        assert job.state is JobState.SUCCEEDED, job.error
        assert _rtt_ms(t.ping(t.a, "a1", ips["a2"])["stdout"]) >= 45
    else:  # this kernel has no netem: the refusal says so, and rate works through tbf
        with pytest.raises(Exception, match="can't emulate delay"):
            t.a.submit([Operation.build(Op.SET, "neta", "a2", nic=0, shaping={"delay_ms": 50})])
    [job] = t.a.wait([j.id for j in t.a.submit([Operation.build(
        Op.SET, "neta", "a2", nic=0, shaping={"rate_kbit": 100})])], timeout=60)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result is not None and job.result["live"] is True
    assert fast_replies() <= 2
    assert "rate 100kbit" in t.a.vm("neta", "a2").nics[0].shaping.describe()
    [job] = t.a.wait([j.id for j in t.a.submit([Operation.build(
        Op.SET, "neta", "a2", nic=0, shaping={"rate_kbit": 0, "delay_ms": 0})])], timeout=60)
    assert job.state is JobState.SUCCEEDED, job.error
    assert t.a.vm("neta", "a2").nics[0].shaping.empty


def test_the_last_vm_of_a_host_takes_its_bridge_with_it(topo: Topology) -> None:
    t = topo
    vni_a = t.a.network("neta", "lan").vni
    vni_b = t.b.network("netb", "lan").vni
    for client, vm in ((t.a, "a2"), (t.b, "b1")):  # the VMs of namespace A's and B's networks on h1
        ns = client.settings.namespace
        [job] = client.wait([j.id for j in client.submit([Operation.build(Op.DELETE, ns, vm)])], timeout=60)
        assert job.state is JobState.SUCCEEDED, job.error
    links = t.links(1)
    for vni in (vni_a, vni_b):
        assert f"vmbr{vni}" not in links and f"vmvx{vni}" not in links, links
    assert t.hosts[1] not in t.a.network("neta", "lan").hosts
    assert f"vmbr{vni_a}" in t.links(0)  # h0 still has a1, a3 and the gateway
    for name, value in sorted(t.timings.items()):
        print(f"{name}: {value:.3f}")



def test_the_example_topology_pings_through_its_router_and_tears_down(topo: Topology) -> None:
    """examples/topology.yaml: two networks it makes itself, a router VM with a NIC on each; the ping
    step checks its exit code; the networks go once the teardown is over."""
    t = topo
    client = RedisClient(t.settings.model_copy(update={"namespace": "netc"}))
    text = (ROOT / "examples" / "topology.yaml").read_text()
    run = client.run_experiment(text, namespace="netc", source="examples/topology.yaml")
    nets = client.networks("netc")
    assert {n.name for n in nets} == {"left", "right"}
    jobs = client.wait([s.job for s in run.steps], timeout=420)
    by_step = {s.name: j for s, j in zip(run.steps, jobs, strict=True)}
    failed = {name: (j.state.value, j.error) for name, j in by_step.items() if j.state is not JobState.SUCCEEDED}
    assert not failed, failed
    children = client.children(by_step["ping-through"].id)
    assert children and children[0].result is not None and children[0].result["exit_code"] == 0
    assert "3 packets received" in children[0].result["stdout"], children[0].result
    wait_until(lambda: client.networks("netc") == [], timeout=60, what="the experiment's networks deleted")
    for i in range(2):
        wait_until(lambda i=i: not any(f"vmbr{n.vni}" in t.links(i) for n in nets), timeout=30,
                   what=f"the experiment's bridges gone from host {i}")


def test_a_bridge_this_host_did_not_make_is_left_alone(topo: Topology) -> None:
    """Another vmorch on the same kernel (a second cluster, a test run beside a local cluster) has
    bridges with names like ours: a host's sweep only ever removes the ones it made."""
    t = topo
    ns = t.underlay.host_ns(0)
    t.underlay.run(ns, ["ip", "link", "add", "vmbr77", "type", "bridge"])
    try:
        # a network with its gateway on h0, made and torn down twice: the sweep that makes the second
        # ready started after the whole sweep that tore down the first (which looked at every bridge)
        for _ in range(2):
            t.a.create_network("neta", NetworkSpec(name="tmp", subnet="10.77.0.0/24", host=t.hosts[0]))
            t.a.wait_network("neta", "tmp", gone=False, timeout=60)
            t.a.delete_network("neta", "tmp")
            t.a.wait_network("neta", "tmp", gone=True, timeout=60)
        assert "vmbr77" in t.links(0)
    finally:
        t.underlay.run(ns, ["ip", "link", "del", "vmbr77"])
