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


def test_a_disk_goes_only_where_the_store_has_room_for_it_and_the_margin() -> None:
    gib = 1024**3
    roomy, tight = host("roomy", store_free_bytes=str(100 * gib)), host("tight", store_free_bytes=str(int(10.5 * gib)))
    big = placement.Request("a", memory_mib=512, vcpus=1, disk_gib=10)
    assert placement.plan([big], [tight, roomy]) == {"a": "roomy"}
    with pytest.raises(NoCapacity, match=r"^host tight has 10\.5 GiB free in its store; the disk needs 10 GiB \+ 1 "):
        placement.plan([placement.Request("a", memory_mib=512, vcpus=1, disk_gib=10, host="tight")], [tight, roomy])
    # the disks of one request count against each other; a host that reports nothing is not judged
    many = [placement.Request(f"v{i}", memory_mib=16, vcpus=1, disk_gib=30) for i in range(4)]
    with pytest.raises(NoCapacity, match=r"host roomy has 10\.0 GiB free"):
        placement.plan(many, [roomy])
    assert placement.plan(many, [host("old")]) == {f"v{i}": "old" for i in range(4)}
    assert placement.plan([big], [tight], limits=placement.Limits(disk_margin_gib=0)) == {"a": "tight"}


def test_the_worker_checks_the_room_again_right_before_making_the_disk(
        tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from worker import disks

    monkeypatch.setattr(disks, "STORE_ROOM", disks.StoreRoom("h9", margin_gib=10.0**9))
    disk = Path(str(tmp_path)) / "vms" / "x.qcow2"
    with pytest.raises(NoCapacity, match=r"^host h9 has [0-9.]+ GiB free in its store; the disk needs 2 GiB \+ 1e"):
        disks.create_disk(disk, 2, None)
    assert not disk.exists()
