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


def test_equal_vms_spread_evenly_over_equal_hosts_even_when_their_sizes_differ_a_little() -> None:
    # The local cluster's hosts are shares of one machine; workers read its size at different moments.
    hosts = [host("h1", memory_mib="12003"), host("h2", memory_mib="11990"), host("h3", memory_mib="12001")]
    chosen = placement.plan([request(f"web{i}") for i in range(1, 7)], hosts)
    assert sorted(chosen.values()) == ["h1", "h1", "h2", "h2", "h3", "h3"]


def test_the_least_loaded_host_by_share_gets_the_next_vm_and_a_bigger_host_takes_more() -> None:
    small = host("small", memory_mib="4096", committed_mib="2048")  # half full
    big = host("big", memory_mib="16384", committed_mib="4096")  # a quarter full, more free memory too
    assert placement.plan([request("a")], [small, big]) == {"a": "big"}
    busy_big = host("big", memory_mib="16384", committed_mib="12288")  # three quarters full, still more MiB free
    assert placement.plan([request("b")], [small, busy_big]) == {"b": "small"}
    # 8 GiB of 512 MiB VMs over a 4 GiB and a 12 GiB empty host: about 1 to 3
    chosen = placement.plan([request(f"v{i}") for i in range(16)],
                            [host("s", memory_mib="4096"), host("l", memory_mib="12288")])
    assert list(chosen.values()).count("l") == 12
