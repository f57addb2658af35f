"""Host liveness: heartbeats, down hosts and their jobs' deadline, draining."""

from __future__ import annotations

import json
import time

from orchestrator.model.operation import Op
from orchestrator.model.records import HostState, JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient

from .conftest import WorkerProc, ops, run_cli, start_worker, wait_hosts_up, wait_until


def host_state(client: RedisClient, name: str) -> HostState:
    return {h.name: h.state for h in client.hosts()}[name]


def test_jobs_of_a_down_host_wait_then_fail_with_a_reason(cluster: list[WorkerProc], base_settings: Settings,
                                                          client: RedisClient, settings: Settings) -> None:
    ns = settings.namespace
    worker = start_worker(base_settings, "hd")
    try:
        wait_hosts_up(base_settings, worker)
        [launch] = client.submit(ops(Op.LAUNCH, ns, "lonely", memory_mib=32, host="hd"))
        client.wait([launch.id])
    finally:
        worker.stop()
    assert host_state(client, "hd") is HostState.DOWN
    assert client.vm(ns, "lonely").state is VmState.UNKNOWN

    submitted = time.monotonic()
    proc = run_cli(settings, "--json", "vm", "pause", "lonely")
    assert proc.returncode == 0 and "host hd is down" in proc.stderr and "warning" in proc.stderr
    job = json.loads(proc.stdout)
    [failed] = client.wait([job["id"]], timeout=30)
    took = time.monotonic() - submitted
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error.code == "host_down" and failed.error.message == "host hd is down"
    assert took >= 1.0, "failed before the deadline"  # the host's last beat was a moment before the submit
    assert took < settings.host_down_deadline + 10, f"waited {took:.1f}s"

    # The host comes back: new jobs run as usual, and the VM can be deleted.
    back = start_worker(base_settings, "hd")
    try:
        wait_hosts_up(base_settings, back)
        [delete] = client.submit(ops(Op.DELETE, ns, "lonely"))
        assert client.wait([delete.id], timeout=30)[0].state is JobState.SUCCEEDED
    finally:
        back.stop()


def test_a_draining_host_gets_no_new_vms(cluster: list[WorkerProc], client: RedisClient,
                                         settings: Settings) -> None:
    drained = run_cli(settings, "--json", "host", "drain", "t2")
    assert drained.returncode == 0 and json.loads(drained.stdout)["state"] == "draining"
    try:
        jobs = client.submit(ops(Op.LAUNCH, settings.namespace, "dr[1-4]", memory_mib=32))
        assert {j.host for j in jobs} == {"t1"}
        refused = run_cli(settings, "vm", "launch", "pinned", "--host", "t2")
        assert refused.returncode == 2 and "host 't2' is draining" in refused.stderr
        # VMs already on a draining host keep working
        client.wait([j.id for j in jobs])
    finally:
        undrained = run_cli(settings, "--json", "host", "undrain", "t2")
        assert json.loads(undrained.stdout)["state"] == "up"
    wait_until(lambda: host_state(client, "t2") is HostState.UP, what="t2 up")
    unknown = run_cli(settings, "host", "drain", "atlantis")
    assert unknown.returncode == 3 and "unknown host 'atlantis'" in unknown.stderr
