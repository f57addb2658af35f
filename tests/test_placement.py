"""Placement's rules, on host records as workers write them (a pure decision: no Redis needed).

Placement over real workers is in ``test_cluster.py``; a real libvirtd going away, in
``test_doctor.py``.
"""

from __future__ import annotations

import pytest

from orchestrator.control import placement
from orchestrator.model.errors import InvalidInput, NoCapacity
from orchestrator.model.records import Host


def host(name: str, **fields: str) -> Host:
    record = {"name": name, "heartbeat_at": "1000", "pid": "1", "libvirt_uri": "qemu:///system",
              "cpus": "8", "memory_mib": "8192", "libvirt_ok": "1", **fields}
    return Host.from_hash(record, now=1000.5, down_after=6, vms=0)


def request(vm: str, host: str | None = None) -> placement.Request:
    return placement.Request(vm, memory_mib=512, vcpus=1, host=host)


def test_a_host_whose_libvirt_failed_its_probe_gets_no_vm() -> None:
    broken = host("big", memory_mib="65536", libvirt_ok="", libvirt_error="Failed to connect socket")
    hosts = [broken, host("small")]
    assert placement.plan([request("a"), request("b")], hosts) == {"a": "small", "b": "small"}
    with pytest.raises(InvalidInput, match="host 'big' can't reach its libvirt: Failed to connect socket"):
        placement.plan([request("a", host="big")], hosts)


def test_an_unprobed_host_still_counts() -> None:
    """A record without a probe verdict (a worker older than the probe) is not judged."""
    unprobed = Host.from_hash({"name": "old", "heartbeat_at": "1000", "pid": "1", "libvirt_uri": "test:///default",
                               "cpus": "8", "memory_mib": "8192"}, now=1000.5, down_after=6, vms=0)
    assert unprobed.libvirt_ok is None
    assert placement.plan([request("a")], [unprobed]) == {"a": "old"}


def test_when_no_up_host_reaches_its_libvirt_the_refusal_says_why_for_each() -> None:
    hosts = [host("h1", libvirt_ok="", libvirt_error="connection reset"), host("h2", libvirt_ok=""),
             host("h3", libvirt_ok="", heartbeat_at="900")]  # down: not worth naming
    with pytest.raises(NoCapacity) as refused:
        placement.plan([request("a")], hosts)
    assert refused.value.message == ("no host that is up can reach its libvirt "
                                          "(h1: connection reset; h2: no answer)")
    assert "vmorch doctor" in (refused.value.hint or "")
