"""Reconciliation at worker start: the registry takes libvirt's word for its host's VMs."""

from __future__ import annotations

from orchestrator.model.operation import Op
from orchestrator.model.records import JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import ops, start_worker, wait_hosts_up


def test_a_restarted_worker_repairs_the_registry(base_settings: Settings, client: RedisClient) -> None:
    ns = client.settings.namespace
    first = start_worker(base_settings, "rc1")
    try:
        wait_hosts_up(base_settings, first)
        jobs = client.submit(ops(Op.LAUNCH, ns, "rc[1-2]", memory_mib=32, host="rc1"))
        assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in jobs]))
    finally:
        first.stop()
    assert {v.state for v in client.vms(ns)} == {VmState.UNKNOWN}  # the host is down: vmorch can't know
    # test:///default keeps its domains in the worker process: they died with it, behind vmorch's back.
    second = start_worker(base_settings, "rc1")
    try:
        wait_hosts_up(base_settings, second)
        vms = client.vms(ns)
        assert [(v.name, v.state) for v in vms] == [("rc1", VmState.MISSING), ("rc2", VmState.MISSING)]
        assert all(v.note and "reconciled" in v.note and "was running" in v.note for v in vms)
        deletes = client.submit(ops(Op.DELETE, ns, "rc[1-2]"))  # deleting a missing VM cleans the registry
        assert all(j.state is JobState.SUCCEEDED for j in client.wait([j.id for j in deletes]))
        assert client.vms(ns) == []
    finally:
        second.stop()
