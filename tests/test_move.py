"""Moving a shut-off VM between hosts: definition and disk go along, the VM's order holds."""

from __future__ import annotations

import shutil

import pytest
from redis import Redis

from orchestrator.control.queue import enqueue
from orchestrator.model.errors import InvalidInput
from orchestrator.model.operation import Op
from orchestrator.model.records import Job, JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys
from orchestrator.store.jobstore import BatchEntry

from .conftest import WorkerProc, ops, run_cli
from .test_ordering import assert_serialized_in_order
from .test_qemu import qemu_pids
from .test_reliability import qemu_host


def run(client: RedisClient, op: Op, target: str, **params: object) -> list[Job]:
    jobs = client.submit(ops(op, client.settings.namespace, target, **params))
    return client.wait([j.id for j in jobs], timeout=120)


def committed(client: RedisClient, host: str) -> int:
    return client.store.host(host).committed_mib


def test_move_a_shut_off_vm_and_the_jobs_queued_behind_it(cluster: list[WorkerProc], client: RedisClient) -> None:
    ns = client.settings.namespace
    before = {h: committed(client, h) for h in ("t1", "t2")}
    [launch] = run(client, Op.LAUNCH, "mv", memory_mib=48, host="t1", tags={"role": "db"})
    assert launch.state is JobState.SUCCEEDED
    # kill, move, then start and pause: submitted back to back, before the move has run
    jobs = client.submit(ops(Op.KILL, ns, "mv") + ops(Op.MOVE_OUT, ns, "mv", to="t2")
                         + ops(Op.START, ns, "mv") + ops(Op.PAUSE, ns, "mv"))
    assert [j.op for j in jobs] == [Op.KILL, Op.MOVE_OUT, Op.MOVE_IN, Op.START, Op.PAUSE]
    done = client.wait([j.id for j in jobs], timeout=60)
    assert all(j.state is JobState.SUCCEEDED for j in done), [(j.op, j.error) for j in done]
    assert_serialized_in_order([launch, *done])
    vm = client.vm(ns, "mv")
    assert (vm.host, vm.state, vm.tags, vm.memory_mib) == ("t2", VmState.PAUSED, {"role": "db"}, 48)
    assert committed(client, "t1") == before["t1"] and committed(client, "t2") == before["t2"] + 48
    assert (ns, "mv") in client.store.vms_on_host("t2") and (ns, "mv") not in client.store.vms_on_host("t1")
    [delete] = run(client, Op.DELETE, "mv")
    assert delete.state is JobState.SUCCEEDED and delete.host == "t2"
    assert committed(client, "t2") == before["t2"]


def test_moves_that_cannot_happen_are_refused_with_the_reason(cluster: list[WorkerProc], client: RedisClient,
                                                              settings: Settings) -> None:
    ns = client.settings.namespace
    assert run(client, Op.LAUNCH, "busy", memory_mib=32, host="t1")[0].state is JobState.SUCCEEDED
    with pytest.raises(InvalidInput, match="only a shut-off VM moves"):
        client.submit(ops(Op.MOVE_OUT, ns, "busy", to="t2"))
    with pytest.raises(InvalidInput, match="already on host 't1'"):
        client.submit(ops(Op.MOVE_OUT, ns, "busy", to="t1"))
    live = run_cli(settings, "vm", "move", "busy", "--to", "t2", "--live")
    assert live.returncode == 2 and "live migration is not possible here" in live.stderr
    assert "test:///default" in live.stderr and "hint:" in live.stderr
    unknown = run_cli(settings, "vm", "move", "busy", "--to", "atlantis")
    assert unknown.returncode == 2 and "unknown host 'atlantis'" in unknown.stderr


def test_a_failed_move_out_keeps_the_vm_and_gives_the_room_back(cluster: list[WorkerProc],
                                                                client: RedisClient) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "snappy", memory_mib=40, host="t1")
    run(client, Op.SNAPSHOT, "snappy", name="s1")
    run(client, Op.KILL, "snappy")
    before = committed(client, "t2")
    # accepted but not yet sent, so the reservation can be seen before the move-out runs
    _, accepted = client.store.submit_batch([BatchEntry(ops(Op.MOVE_OUT, ns, "snappy", to="t2")[0], host="t2",
                                                        source="t1")])
    assert committed(client, "t2") == before + 40
    for s in accepted:
        enqueue(client.celery, s.host, ns, "snappy", s.id)
    out, into = client.wait([s.id for s in accepted])
    assert out.state is JobState.FAILED and out.error is not None and "snapshots" in out.error.message
    assert into.state is JobState.FAILED and into.error is not None and "nothing to import" in into.error.message
    assert committed(client, "t2") == before
    vm = client.vm(ns, "snappy")
    assert (vm.host, vm.state) == ("t1", VmState.SHUTOFF)
    assert run(client, Op.START, "snappy")[0].state is JobState.SUCCEEDED


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_move_a_real_vm_with_its_disk(base_settings: Settings, client: RedisClient) -> None:
    with qemu_host(base_settings, "qa", client) as a, qemu_host(base_settings, "qb", client) as b:
        assert run(client, Op.LAUNCH, "travel", memory_mib=64, host="qa", disk_gib=1)[0].state is JobState.SUCCEEDED
        assert run(client, Op.KILL, "travel")[0].state is JobState.SUCCEEDED
        out, into = run(client, Op.MOVE_OUT, "travel", to="qb")
        assert out.state is into.state is JobState.SUCCEEDED, (out.error, into.error)
        assert out.result is not None and out.result["bytes"] > 0  # the qcow2 went along
        [start] = run(client, Op.START, "travel")
        assert start.state is JobState.SUCCEEDED and start.host == "qb"
        assert qemu_pids(b.root) and not qemu_pids(a.root)
        # its disk left qa's VM-disk store for qb's (named by each host's own key, not after the VM)
        assert not list((base_settings.home / "hosts" / "qa" / "disks" / "vms").glob("*.qcow2"))
        assert len(list((base_settings.home / "hosts" / "qb" / "disks" / "vms").glob("*.qcow2"))) == 1
        assert run(client, Op.DELETE, "travel")[0].state is JobState.SUCCEEDED


def test_a_batch_of_moves_with_one_impossible_is_refused_whole(cluster: list[WorkerProc], client: RedisClient,
                                                               redis: Redis) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "bm[1-2]", memory_mib=16, host="t1")
    run(client, Op.KILL, "bm1")  # bm1 may move; bm2 is running and may not
    before = redis.get(keys.JOB_NEXT)
    with pytest.raises(InvalidInput, match="'bm2' is running"):
        client.submit(ops(Op.MOVE_OUT, ns, "bm[1-2]", to="t2"))
    assert redis.get(keys.JOB_NEXT) == before, "part of the batch was accepted"
    assert client.vm(ns, "bm1").host == "t1"
