"""What vmorch does to one VM port (its tap, on the host): traffic shaping towards the VM with tc,
and packet capture with tcpdump.

Shaping uses netem where the kernel has it (delay, loss and rate in one qdisc); a kernel without
netem (CONFIG_NET_SCH_NETEM unset) can still limit the rate, with tbf, but can't delay or drop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time

from orchestrator.model.errors import ExecError

from .netsegment import link_index, netlink, require_link, run_tool

#: how long one capture may run, whatever the caller asks
MAX_CAPTURE_SECONDS = 600.0
#: tbf: how long a packet may wait in the queue before it is dropped
TBF_LATENCY_MS = 100
_SNAPLEN = 262144
_LINKTYPE_ETHERNET = 1
_PCAP_HEADER = 24
_RECORD_HEADER = 16
_NO_NETEM = ("this host's kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): --delay and --loss can't be done here")
_probe_lock = threading.Lock()


def _tc() -> str:
    exe = shutil.which("tc")
    if exe is None:
        raise ExecError("tc is not installed on this host", hint="apt-get install iproute2")
    return exe


@functools.cache
def shaping_support() -> frozenset[str]:
    """Which of "rate", "delay", "loss" this kernel can do (probed once per process)."""
    with _probe_lock:
        qdiscs = _probe_qdiscs()
    if "netem" in qdiscs:
        return frozenset({"rate", "delay", "loss"})
    return frozenset({"rate"}) if "tbf" in qdiscs else frozenset()


def _probe_qdiscs() -> set[str]:
    # on a throwaway veth pair: a probe must never touch a device that carries traffic
    probe = f"vmpr{os.getpid() % 1_000_000}"
    tc = _tc()
    with netlink("could not make a veth pair to probe tc on") as ipr:
        for name in (probe + "a", probe + "b"):
            index = link_index(ipr, name)
            if index is not None:  # left by a probe of a crashed process with the same pid
                ipr.link("del", index=index)
        ipr.link("add", ifname=probe + "a", kind="veth", peer=probe + "b")
    try:
        found = set()
        for kind, args in (("netem", ["delay", "1ms"]), ("tbf", ["rate", "1mbit", "burst", "4kb", "latency", "10ms"])):
            proc = subprocess.run([tc, "qdisc", "replace", "dev", probe + "a", "root", kind, *args],
                                  capture_output=True, timeout=10, check=False, stdin=subprocess.DEVNULL)
            if proc.returncode == 0:
                found.add(kind)
        return found
    finally:
        with netlink("could not remove the tc probe's veth pair") as ipr:
            index = link_index(ipr, probe + "a")
            if index is not None:
                ipr.link("del", index=index)


def shape(dev: str, *, delay_ms: float | None = None, loss_pct: float | None = None,
          rate_kbit: int | None = None) -> None:
    """Shape the egress of ``dev`` (a VM's tap: the traffic towards the VM); all None: unshaped."""
    _check_shape(delay_ms, loss_pct, rate_kbit)
    with netlink(f"could not look up {dev}") as ipr:
        index = require_link(ipr, dev, "is the VM running?")
        mtu = int(ipr.link("get", index=index)[0].get("mtu"))
    tc = _tc()
    if delay_ms is None and loss_pct is None and rate_kbit is None:
        _unshape(tc, dev)
        return
    support = shaping_support()
    if "delay" in support:
        argv = [tc, "qdisc", "replace", "dev", dev, "root", "netem"]
        argv += ["delay", f"{delay_ms}ms"] if delay_ms is not None else []
        argv += ["loss", f"{loss_pct}%"] if loss_pct is not None else []
        argv += ["rate", f"{rate_kbit}kbit"] if rate_kbit is not None else []
    elif delay_ms is not None or loss_pct is not None:
        raise ExecError(_NO_NETEM, hint="run the VM on a host whose kernel has sch_netem, or shape only --rate")
    elif "rate" in support and rate_kbit is not None:
        # the bucket holds at least one whole frame (else nothing passes), or 20 ms at the rate
        burst = max(mtu + 64, rate_kbit * 1000 // 8 // 50)
        argv = [tc, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_kbit}kbit",
                "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]
    else:
        raise ExecError("this host's kernel has neither netem nor tbf: no traffic shaping here",
                        hint="run the VM on a host whose kernel has sch_netem or sch_tbf")
    run_tool(argv, f"could not shape {dev}")


def _check_shape(delay_ms: float | None, loss_pct: float | None, rate_kbit: int | None) -> None:
    if delay_ms is not None and not 0 <= delay_ms <= 60_000:
        raise ExecError(f"delay {delay_ms} ms is out of range 0..60000")
    if loss_pct is not None and not 0 <= loss_pct <= 100:
        raise ExecError(f"loss {loss_pct}% is out of range 0..100")
    if rate_kbit is not None and rate_kbit < 1:
        raise ExecError(f"rate {rate_kbit} kbit/s must be at least 1")


def _unshape(tc: str, dev: str) -> None:
    subprocess.run([tc, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=10, check=False,
                   stdin=subprocess.DEVNULL)  # fails when there is nothing to delete: checked below
    qdiscs = json.loads(run_tool([tc, "-j", "qdisc", "show", "dev", dev], f"could not list the qdiscs of {dev}")
                        or "[]")
    left = [q.get("kind") for q in qdiscs if q.get("root") and q.get("kind") in ("netem", "tbf")]
    if left:
        raise ExecError(f"could not remove the {left[0]} qdisc of {dev}", hint=f"tc qdisc del dev {dev} root")


def capture(dev: str, *, seconds: float, max_bytes: int, max_packets: int = 100_000) -> bytes:
    """A pcap of what crosses ``dev`` for at most ``seconds``, ``max_packets`` packets and
    ``max_bytes`` bytes (whole packets only); a valid pcap even when nothing crossed."""
    if not 0 < seconds <= MAX_CAPTURE_SECONDS:
        raise ExecError(f"a capture lasts more than 0 and at most {MAX_CAPTURE_SECONDS:.0f} seconds, not {seconds}")
    if max_bytes < _PCAP_HEADER or max_packets < 1:
        raise ExecError(f"a capture needs max_bytes >= {_PCAP_HEADER} and max_packets >= 1")
    with netlink(f"could not look up {dev}") as ipr:
        require_link(ipr, dev, "is the VM running?")
    exe = shutil.which("tcpdump")
    if exe is None:
        raise ExecError("tcpdump is not installed on this host", hint="apt-get install tcpdump")
    # -w -: the pcap comes through a pipe, so its size is counted as it grows, and tcpdump may drop
    # its privileges without needing a file it can write
    argv = [exe, "-i", dev, "-w", "-", "-U", "-n", "-p", "--immediate-mode", "-s", str(_SNAPLEN),
            "-c", str(max_packets)]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        data = bytearray()
        try:
            _read_until(proc.stdout.fileno(), data, time.monotonic() + seconds, max_bytes)
        finally:
            stopped_by_us = _stop(proc)
            data += _drain(proc.stdout.fileno())
            proc.stdout.close()
        if not stopped_by_us and proc.returncode != 0 and len(data) < _PCAP_HEADER:
            errors.seek(0)
            reason = errors.read().decode(errors="replace").strip().splitlines()
            raise ExecError(f"tcpdump could not capture on {dev}: {reason[-1] if reason else proc.returncode}")
    return _whole_records(bytes(data), max_bytes)


def _read_until(fd: int, data: bytearray, deadline: float, max_bytes: int) -> None:
    while len(data) < max_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:  # tcpdump ended by itself: max_packets reached, or it failed
                return
            data += chunk


def _stop(proc: subprocess.Popen[bytes]) -> bool:
    """Stop tcpdump (by its pid) if it still runs; whether it did."""
    if proc.poll() is not None:
        return False
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
            break
    return True


def _drain(fd: int) -> bytes:
    """What tcpdump wrote before it ended (it has ended, so the pipe reaches its end)."""
    out = bytearray()
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            out += chunk
    return bytes(out)


def _whole_records(data: bytes, max_bytes: int) -> bytes:
    """``data`` cut after its last whole record that fits in ``max_bytes``."""
    if len(data) < _PCAP_HEADER:
        return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, _SNAPLEN, _LINKTYPE_ETHERNET)
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    end = _PCAP_HEADER
    while end + _RECORD_HEADER <= len(data):
        (caplen,) = struct.unpack_from(order + "I", data, end + 8)
        following = end + _RECORD_HEADER + caplen
        if following > len(data) or following > max_bytes:
            break
        end = following
    return data[:end]
