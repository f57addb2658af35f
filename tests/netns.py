"""Real network namespaces for tests: an underlay that joins several "hosts", and fake VMs.

``Underlay(hosts=N)`` makes, under names unique to this process (prefix ``vmt<pid><n>``):

* an underlay namespace ``<prefix>u`` holding a bridge, the stand-in for the hosts' network;
* host namespaces ``<prefix>h<i>`` (i = 0..N-1), each with a veth ``ul0`` into that bridge at
  198.18.0.(10+i)/24;
* a veth from the root namespace (``<prefix>r``, 198.18.0.1/24), so processes in the host namespaces
  reach servers that a test binds on 198.18.0.1 (one Underlay at a time holds that address: the others
  wait for a file lock);
* an "outside" namespace ``<prefix>o`` at 198.18.0.200, the stand-in for the internet.

No default route anywhere, nothing bridged or routed to the machine's own uplink. ``cleanup()`` (also
at exit) stops the processes left in these namespaces and removes every namespace and veth, and
may be called any number of times.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

UNDERLAY_PREFIX = "198.18.0"
ROOT_ADDR = f"{UNDERLAY_PREFIX}.1"
OUTSIDE_ADDR = f"{UNDERLAY_PREFIX}.200"
ROOT_LOCK = Path("/run/lock/vmorch-test-underlay.lock")
_serial = itertools.count()


def ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def exec_argv(ns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside network namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


@dataclass(frozen=True)
class FakeVm:
    """A namespace standing in for a guest: ``eth0`` in ``ns``, its peer ``port`` on a bridge of a host."""

    ns: str
    host_ns: str
    port: str
    mac: str

    def exec_argv(self, argv: list[str]) -> list[str]:
        return exec_argv(self.ns, argv)

    def run(self, argv: list[str], *, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_argv(argv), capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def ping(self, address: str, *, count: int = 1, wait: float = 2) -> bool:
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), address]
        return self.run(argv, timeout=count * wait + 10).returncode == 0


class Underlay:
    def __init__(self, hosts: int = 2, *, root_link: bool = True, outside: bool = True,
                 lock_timeout: float = 120) -> None:
        if not 1 <= hosts <= 100:
            raise ValueError("1 to 100 hosts")
        self.prefix = f"vmt{os.getpid()}{next(_serial) % 36:x}"
        self.hosts = hosts
        self.underlay_ns = self.prefix + "u"
        self.outside_ns = self.prefix + "o"
        self.root_dev = self.prefix + "r"
        self._namespaces: list[str] = []
        self._vms = itertools.count()
        self._lock: int | None = None
        self._cleaned = False
        atexit.register(self.cleanup)
        try:
            self._make(root_link, outside, lock_timeout)
        except BaseException:
            self.cleanup()
            raise

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self._namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _join(self, ns: str, address: str, port: str) -> None:
        """A veth ``ul0`` in ``ns`` at ``address``, its peer ``port`` on the underlay bridge."""
        ip("-n", self.underlay_ns, "link", "add", port, "type", "veth", "peer", "name", "ul0", "netns", ns)
        ip("-n", self.underlay_ns, "link", "set", port, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "ul0")
        ip("-n", ns, "link", "set", "ul0", "up")

    def _make(self, root_link: bool, outside: bool, lock_timeout: float) -> None:
        self._add_ns(self.underlay_ns)
        ip("-n", self.underlay_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.underlay_ns, "link", "set", "br0", "up")
        for i in range(self.hosts):
            self._add_ns(self.host_ns(i))
            self._join(self.host_ns(i), self.host_addr(i), f"h{i}")
        if outside:
            self._add_ns(self.outside_ns)
            self._join(self.outside_ns, OUTSIDE_ADDR, "out")
        if root_link:
            self._lock = _take_lock(lock_timeout)
            ip("link", "add", self.root_dev, "type", "veth", "peer", "name", "root", "netns", self.underlay_ns)
            ip("-n", self.underlay_ns, "link", "set", "root", "master", "br0", "up")
            ip("addr", "add", f"{ROOT_ADDR}/24", "dev", self.root_dev)
            ip("link", "set", self.root_dev, "up")

    def host_ns(self, i: int) -> str:
        if not 0 <= i < self.hosts:
            raise IndexError(f"host {i} of {self.hosts}")
        return f"{self.prefix}h{i}"

    def host_addr(self, i: int) -> str:
        if not 0 <= i < self.hosts:
            raise IndexError(f"host {i} of {self.hosts}")
        return f"{UNDERLAY_PREFIX}.{10 + i}"

    @staticmethod
    def exec_argv(ns: str, argv: list[str]) -> list[str]:
        return exec_argv(ns, argv)

    def run(self, ns: str, argv: list[str], *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(exec_argv(ns, argv), capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def fake_vm(self, host: int, bridge: str, *, address: str | None = None, gateway: str | None = None) -> FakeVm:
        """A fake guest on ``bridge`` of host ``host``; ``address`` as "10.77.0.10/24", ``gateway`` its
        default route (inside the fake guest only)."""
        host_ns = self.host_ns(host)
        n = next(self._vms)
        ns, port = f"{self.prefix}v{n}", f"fv{n}"
        self._add_ns(ns)
        ip("-n", host_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        mtu = str(json.loads(ip("-n", host_ns, "-j", "link", "show", bridge).stdout)[0]["mtu"])
        ip("-n", host_ns, "link", "set", port, "mtu", mtu, "master", bridge, "up")
        ip("-n", ns, "link", "set", "eth0", "mtu", mtu, "up")
        if address is not None:
            ip("-n", ns, "addr", "add", address, "dev", "eth0")
        if gateway is not None:
            ip("-n", ns, "route", "add", "default", "via", gateway)
        mac = json.loads(ip("-n", ns, "-j", "link", "show", "eth0").stdout)[0]["address"]
        return FakeVm(ns, host_ns, port, str(mac).lower())

    def remove_vm(self, vm: FakeVm) -> None:
        _stop_processes(vm.ns)
        ip("netns", "del", vm.ns, check=False)
        with contextlib.suppress(ValueError):
            self._namespaces.remove(vm.ns)

    def cleanup(self) -> None:
        """Remove everything this Underlay made; safe to call again, and after a failed ``__init__``."""
        if self._cleaned:
            return
        try:
            for ns in reversed(self._namespaces):
                _stop_processes(ns)
            ip("link", "del", self.root_dev, check=False)
            for ns in reversed(self._namespaces):
                ip("netns", "del", ns, check=False)
            self._namespaces.clear()
        finally:
            if self._lock is not None:
                os.close(self._lock)  # closing drops the flock
                self._lock = None
            self._cleaned = True

    def __enter__(self) -> Underlay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


def _take_lock(timeout: float) -> int:
    fd = os.open(ROOT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"another test holds {ROOT_LOCK} (198.18.0.1 in the root namespace)") from None
            time.sleep(0.2)


def _stop_processes(ns: str) -> None:
    """Stop what runs in ``ns`` (only the tests start processes in these namespaces), by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = ip("netns", "pids", ns, check=False)
        pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie that its parent, maybe this test, hasn't reaped yet is done)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
