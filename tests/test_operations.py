"""Every operation through the real queue and workers, on libvirt's test driver; bad input refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis import Redis

from orchestrator.control.locks import LockManager, vm_lock
from orchestrator.model.errors import AlreadyExists, InvalidInput, NoCapacity, NotFound, VmorchError
from orchestrator.model.operation import Op
from orchestrator.model.records import Job, JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

from .conftest import WorkerProc, accept, ops, wait_unlocked, wait_until


def run(client: RedisClient, op: Op, target: str, **params: object) -> list[Job]:
    jobs = client.submit(ops(op, client.settings.namespace, target, **params))
    return client.wait([j.id for j in jobs], timeout=60)


def one(client: RedisClient, op: Op, target: str, **params: object) -> Job:
    [job] = run(client, op, target, **params)
    return job


def ok(client: RedisClient, op: Op, target: str, **params: object) -> Job:
    job = one(client, op, target, **params)
    assert job.state is JobState.SUCCEEDED, job.error
    return job


def state(client: RedisClient, name: str) -> VmState:
    return client.vm(client.settings.namespace, name).state


def test_lifecycle(cluster: list[WorkerProc], client: RedisClient) -> None:
    launch = ok(client, Op.LAUNCH, "life", memory_mib=64, vcpus=2, tags={"role": "web"})
    assert launch.result is not None and launch.result["state"] == "running"
    assert launch.attempts == 1 and launch.seq == 1
    vm = client.vm(client.settings.namespace, "life")
    assert (vm.state, vm.memory_mib, vm.vcpus, vm.tags) == (VmState.RUNNING, 64, 2, {"role": "web"})
    assert vm.host == launch.host

    again = ok(client, Op.START, "life")
    assert again.result is not None and again.result["changed"] is False and "already running" in again.result["note"]
    # the no-op's answer is the job's, not news about the VM: the VM's note stays what it was
    assert "already" not in (client.vm(client.settings.namespace, "life").note or "")

    ok(client, Op.PAUSE, "life")
    assert state(client, "life") is VmState.PAUSED
    ok(client, Op.RESUME, "life")
    assert state(client, "life") is VmState.RUNNING
    ok(client, Op.REBOOT, "life")
    assert state(client, "life") is VmState.RUNNING

    stopped = ok(client, Op.STOP, "life", force=True, timeout_s=1)
    assert state(client, "life") is VmState.SHUTOFF, stopped.result
    killed = ok(client, Op.KILL, "life")
    assert killed.result is not None and killed.result["changed"] is False  # killing a shut-off VM is a no-op

    refused = one(client, Op.PAUSE, "life")
    assert refused.state is JobState.FAILED and refused.error is not None
    assert refused.error.code == "invalid_state" and "shut off" in refused.error.message
    assert state(client, "life") is VmState.SHUTOFF

    ok(client, Op.START, "life")
    assert state(client, "life") is VmState.RUNNING

    deleted = ok(client, Op.DELETE, "life")
    assert deleted.result is not None
    with pytest.raises(NotFound):
        client.vm(client.settings.namespace, "life")


def test_set_changes_the_definition_and_the_running_vm_where_possible(cluster: list[WorkerProc],
                                                                      client: RedisClient) -> None:
    ok(client, Op.LAUNCH, "res", memory_mib=64, vcpus=1)
    lower = ok(client, Op.SET, "res", memory_mib=48)
    assert lower.result is not None and lower.result["live"] is True
    higher = ok(client, Op.SET, "res", memory_mib=96, vcpus=2)
    assert higher.result is not None and higher.result["live"] is False
    assert "next boot" in higher.result["note"]
    vm = client.vm(client.settings.namespace, "res")
    assert (vm.memory_mib, vm.vcpus) == (96, 2)  # what was set, for the next boot
    # and what the running VM has (read back: 96 MiB is above the maximum it was started with)
    assert (vm.memory_mib_live, vm.vcpus_live) == (48, None), higher.result
    same = ok(client, Op.SET, "res", memory_mib=48)
    vm = client.vm(client.settings.namespace, "res")
    assert same.result is not None and same.result["live"] is True
    assert (vm.memory_mib, vm.memory_mib_live) == (48, None)  # the same again: no "live" beside it
    ok(client, Op.SET, "res", memory_mib=96)
    stopped = ok(client, Op.STOP, "res", timeout_s=0)  # one request, no wait: the test driver obeys at once
    assert stopped.result is not None and stopped.result["state"] == "shutoff"
    vm = client.vm(client.settings.namespace, "res")
    assert (vm.state, vm.memory_mib, vm.memory_mib_live) == (VmState.SHUTOFF, 96, None)  # nothing runs
    ok(client, Op.START, "res")
    ok(client, Op.KILL, "res")
    off = ok(client, Op.SET, "res", memory_mib=80)
    assert off.result is not None and off.result["memory_mib"] == 80
    assert client.vm(client.settings.namespace, "res").memory_mib == 80


def test_snapshot_revert_and_tags(cluster: list[WorkerProc], client: RedisClient) -> None:
    ok(client, Op.LAUNCH, "snap", memory_mib=64)
    ok(client, Op.SNAPSHOT, "snap", name="before")
    assert client.vm(client.settings.namespace, "snap").snapshots == ["before"]
    ok(client, Op.PAUSE, "snap")
    ok(client, Op.REVERT, "snap", name="before")
    assert state(client, "snap") is VmState.RUNNING  # the snapshot was of a running VM
    missing = one(client, Op.REVERT, "snap", name="nope")
    assert missing.state is JobState.FAILED and missing.error is not None and "nope" in missing.error.message

    ok(client, Op.TAG, "snap", set={"a": "1", "b": "2"})
    ok(client, Op.TAG, "snap", set={"c": "3"}, remove=["a"])
    assert client.vm(client.settings.namespace, "snap").tags == {"b": "2", "c": "3"}


def test_ranges_create_one_job_per_vm(cluster: list[WorkerProc], client: RedisClient) -> None:
    jobs = run(client, Op.LAUNCH, "r[1-4]", memory_mib=32)
    assert [j.vm for j in jobs] == ["r1", "r2", "r3", "r4"]
    assert all(j.state is JobState.SUCCEEDED for j in jobs)
    assert len({j.id for j in jobs}) == 4
    paused = run(client, Op.PAUSE, "r[1,3]")
    assert [j.vm for j in paused] == ["r1", "r3"]
    states = {v.name: v.state for v in client.vms(client.settings.namespace)}
    assert states == {"r1": VmState.PAUSED, "r2": VmState.RUNNING, "r3": VmState.PAUSED, "r4": VmState.RUNNING}


def test_launch_pins_and_places(cluster: list[WorkerProc], client: RedisClient) -> None:
    pinned = ok(client, Op.LAUNCH, "pin", memory_mib=32, host="t2")
    assert pinned.host == "t2" and client.vm(client.settings.namespace, "pin").host == "t2"
    hosts = {h.name: h for h in client.hosts()}
    assert hosts["t2"].vms >= 1 and hosts["t2"].committed_mib >= 32


@contextmanager
def nothing_changes(redis: Redis, namespace: str) -> Iterator[None]:
    """Asserts the block accepted no job and wrote nothing to the namespace."""
    assert not wait_unlocked(redis, namespace)  # the last job's lock, released just after it finished
    before_id = redis.get(keys.JOB_NEXT)
    before = sorted(k for k in redis.scan_iter(f"*{namespace}*") if not k.startswith("lock-signal:"))
    queues = {q: redis.llen(q) for q in ("host.t1", "host.t2")}
    yield
    assert redis.get(keys.JOB_NEXT) == before_id, "a job was accepted"
    after = sorted(k for k in redis.scan_iter(f"*{namespace}*") if not k.startswith("lock-signal:"))
    assert after == before, "keys were written"
    assert {q: redis.llen(q) for q in queues} == queues, "a message was enqueued"


@pytest.mark.parametrize(("op", "target", "params", "error", "text"), [
    (Op.PAUSE, "ghost", {}, NotFound, "no VM 'ghost'"),
    (Op.PAUSE, "ghost[1-2]", {}, NotFound, "no VM"),
    (Op.LAUNCH, "x", {"host": "nowhere"}, InvalidInput, "unknown host 'nowhere'"),
    (Op.LAUNCH, "dup", {}, AlreadyExists, "already exists"),
    (Op.LAUNCH, "big", {"memory_mib": 4 * 1024 * 1024}, NoCapacity, "4194304 MiB"),
])
def test_bad_requests_are_refused_and_change_nothing(cluster: list[WorkerProc], client: RedisClient, redis: Redis,
                                                     op: Op, target: str, params: dict[str, object],
                                                     error: type[VmorchError], text: str) -> None:
    ok(client, Op.LAUNCH, "dup", memory_mib=32)
    with nothing_changes(redis, client.settings.namespace), pytest.raises(error, match=text):
        client.submit(ops(op, client.settings.namespace, target, **params))


def test_a_batch_with_one_bad_target_is_refused_whole(cluster: list[WorkerProc], client: RedisClient,
                                                      redis: Redis) -> None:
    ok(client, Op.LAUNCH, "b1", memory_mib=32)
    with nothing_changes(redis, client.settings.namespace), pytest.raises(NotFound, match="b2"):
        client.submit(ops(Op.PAUSE, client.settings.namespace, "b[1-2]"))
    with nothing_changes(redis, client.settings.namespace), pytest.raises(AlreadyExists, match="b1"):
        client.submit(ops(Op.LAUNCH, client.settings.namespace, "b[0-1]", memory_mib=32))


def test_jobs_after_a_delete_fail_with_a_clear_reason(cluster: list[WorkerProc], client: RedisClient) -> None:
    ok(client, Op.LAUNCH, "gone", memory_mib=32)
    jobs = client.submit(ops(Op.DELETE, client.settings.namespace, "gone")
                         + ops(Op.PAUSE, client.settings.namespace, "gone"))
    delete, pause = client.wait([j.id for j in jobs])
    assert delete.state is JobState.SUCCEEDED
    assert pause.state is JobState.FAILED and pause.error is not None and pause.error.code == "vm_gone"


def test_cancel_a_queued_job(cluster: list[WorkerProc], client: RedisClient) -> None:
    ok(client, Op.LAUNCH, "can", memory_mib=32)
    # accepted but not sent: it stays queued until we deliver it
    accepted = accept(client, ops(Op.PAUSE, client.settings.namespace, "can")[0])
    canceled = client.cancel(accepted.id)
    assert canceled.state is JobState.CANCELED and canceled.error is not None
    assert "canceled by" in canceled.error.message
    later = ok(client, Op.PAUSE, "can")  # the VM's next job is not blocked by the canceled one
    assert later.seq == accepted.seq + 1
    assert client.cancel(later.id).state is JobState.SUCCEEDED  # canceling a final job changes nothing


def test_a_job_waits_while_another_holder_has_the_vm_lock(cluster: list[WorkerProc], client: RedisClient,
                                                          base_settings: Settings) -> None:
    ok(client, Op.LAUNCH, "held", memory_mib=32)
    ns = client.settings.namespace
    other = LockManager(base_settings.resolved_redis_url(), owner="test-holder", expire=4)
    try:
        with other.hold(vm_lock(ns, "held"), timeout=5):
            [job] = client.submit(ops(Op.PAUSE, ns, "held"))
            wait_until(lambda: client.job(job.id).state is JobState.WAITING, what="the job to wait for the lock")
            time.sleep(0.5)  # it keeps waiting while the lock is held
            assert client.job(job.id).state is JobState.WAITING
        [done] = client.wait([job.id], timeout=30)
        assert done.state is JobState.SUCCEEDED and state(client, "held") is VmState.PAUSED
    finally:
        other.close()



def test_snapshot_delete_is_ordered_idempotent_and_shown_with_its_time(
        cluster: list[WorkerProc], client: RedisClient, settings: Settings) -> None:
    import json

    from .conftest import run_cli

    ns = client.settings.namespace
    ok(client, Op.LAUNCH, "sd", memory_mib=32, disk_gib=0)
    ok(client, Op.SNAPSHOT, "sd", name="one")
    ok(client, Op.SNAPSHOT, "sd", name="two")
    vm = client.vm(ns, "sd")
    assert vm.snapshots == ["one", "two"] and [d.name for d in vm.snapshot_details] == ["one", "two"]
    assert all(d.created_at is not None for d in vm.snapshot_details)
    shown = run_cli(settings, "vm", "show", "sd")
    assert shown.returncode == 0 and "one (" in shown.stdout, shown.stdout
    proc = run_cli(settings, "vm", "snapshot-delete", "sd", "one", "--wait")
    assert proc.returncode == 0, proc.stderr
    vm = client.vm(ns, "sd")
    assert vm.snapshots == ["two"] and [d.name for d in vm.snapshot_details] == ["two"]
    # as a redelivery finds it: already gone, so it succeeds without changing anything
    again = ok(client, Op.SNAPSHOT_DELETE, "sd", name="one")
    assert again.result is not None and again.result["changed"] is False
    data = json.loads(run_cli(settings, "--json", "vm", "show", "sd").stdout)
    assert data["snapshots"] == ["two"] and data["snapshot_details"][0]["name"] == "two"
