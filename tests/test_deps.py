"""Dependencies (``--after``): held out of the VM's order, released or failed in the same Lua step."""

from __future__ import annotations

import json

import pytest
from redis import Redis

from orchestrator.model.errors import InvalidInput
from orchestrator.model.operation import Op
from orchestrator.model.records import Job, JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient, SubmitOptions
from orchestrator.store import keys

from .conftest import WorkerProc, ops, run_cli, wait_until
from .test_bulk import vm_held


def run(client: RedisClient, op: Op, target: str, **params: object) -> list[Job]:
    jobs = client.submit(ops(op, client.settings.namespace, target, **params))
    return client.wait([j.id for j in jobs], timeout=60)


def test_a_dependent_job_is_held_without_blocking_its_vm_then_runs(cluster: list[WorkerProc], client: RedisClient,
                                                                   base_settings: Settings, redis: Redis) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "d[1-2]", memory_mib=32, disk_gib=0)
    with vm_held(base_settings, ns, "d1"):
        [first] = client.submit(ops(Op.PAUSE, ns, "d1"))
        [after] = client.submit(ops(Op.PAUSE, ns, "d2"), SubmitOptions(after=[first.id]))
        assert after.state is JobState.QUEUED and after.seq == 0 and after.held and after.after == [first.id]
        assert not redis.exists(keys.vm_mailbox(ns, "d2"))
        # the VM's other jobs are not held up by it: no worker slot waits on a dependency
        [other] = run(client, Op.TAG, "d2", set={"k": "v"})
        assert other.state is JobState.SUCCEEDED
        assert client.job(after.id).state is JobState.QUEUED
    done = client.wait([first.id, after.id], timeout=30)
    assert [j.state for j in done] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    assert done[1].seq > other.seq  # its place in the VM's order is given when it is released
    assert done[1].started_at is not None and done[0].finished_at is not None
    assert done[1].started_at >= done[0].finished_at
    assert client.vm(ns, "d2").state is VmState.PAUSED


def test_a_failed_dependency_fails_its_dependents_at_once_down_the_graph(cluster: list[WorkerProc],
                                                                         client: RedisClient,
                                                                         base_settings: Settings) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "f[1-3]", memory_mib=32, disk_gib=0)
    run(client, Op.KILL, "f1")
    with vm_held(base_settings, ns, "f1"):  # the graph is whole before its first job can fail
        [bad] = client.submit(ops(Op.PAUSE, ns, "f1"))  # fails: f1 is shut off
        middle = client.submit(ops(Op.PAUSE, ns, "f[2-3]"), SubmitOptions(after=[bad.id]))
        parent_id = middle[0].parent or 0
        [last] = client.submit(ops(Op.REBOOT, ns, "f2"), SubmitOptions(after=[parent_id]))
        [teardown] = client.submit(ops(Op.KILL, ns, "f3"), SubmitOptions(after_final=[parent_id]))
    done = client.wait([bad.id, *(j.id for j in middle), parent_id, last.id, teardown.id], timeout=30)
    states = [j.state for j in done]
    assert states == [JobState.FAILED] * 5 + [JobState.SUCCEEDED], done
    for job in done[1:3]:
        assert job.error is not None and job.error.code == "dependency_failed"
        assert job.error.message == f"dependency {bad.id} failed" and job.attempts == 0
    assert done[4].error is not None and done[4].error.message == f"dependency {parent_id} failed"
    assert client.vm(ns, "f2").state is VmState.RUNNING  # nothing ran on it
    assert client.vm(ns, "f3").state is VmState.SHUTOFF  # the teardown ran: it only needed the parent final

    with pytest.raises(InvalidInput, match=f"job {bad.id} to wait for is already failed"):
        client.submit(ops(Op.PAUSE, ns, "f2"), SubmitOptions(after=[bad.id]))
    # a graph submitted piece by piece (an experiment) asks for the failure instead of a refusal
    late = client.submit(ops(Op.PAUSE, ns, "f[2-3]"), SubmitOptions(after=[bad.id], if_dependency_failed="fail"))
    assert [j.state for j in late] == [JobState.FAILED] * 2 and late[0].attempts == 0
    assert late[0].error is not None and late[0].error.message == f"dependency {bad.id} failed"
    late_parent = client.job(late[0].parent or 0)
    assert late_parent.state is JobState.FAILED and late_parent.children is not None
    assert late_parent.children["failed"] == 2
    with pytest.raises(InvalidInput, match="launch jobs can't wait"):
        client.submit(ops(Op.LAUNCH, ns, "f9", memory_mib=32), SubmitOptions(after=[bad.id]))


def test_canceling_a_dependency_fails_the_dependent(cluster: list[WorkerProc], client: RedisClient,
                                                    base_settings: Settings) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "c[1-2]", memory_mib=32, disk_gib=0)
    with vm_held(base_settings, ns, "c1"):
        [first] = client.submit(ops(Op.PAUSE, ns, "c1"))
        [after] = client.submit(ops(Op.PAUSE, ns, "c2"), SubmitOptions(after=[first.id]))
        assert client.cancel(first.id).state is JobState.CANCELED
        dependent = client.job(after.id)
        assert dependent.state is JobState.FAILED and dependent.error is not None
        assert dependent.error.message == f"dependency {first.id} failed"


def test_a_released_job_whose_wake_up_was_lost_is_woken_by_a_janitor(cluster: list[WorkerProc],
                                                                       client: RedisClient, base_settings: Settings,
                                                                       redis: Redis) -> None:
    """The process that finished the dependency dies before sending the wake-up: the job still runs."""
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "z[1-2]", memory_mib=32, disk_gib=0)
    with vm_held(base_settings, ns, "z1"):
        [first] = client.submit(ops(Op.PAUSE, ns, "z1"))
        [after] = client.submit(ops(Op.PAUSE, ns, "z2"), SubmitOptions(after_final=[first.id]))
        _, released = client.store.cancel(first.id, "test")  # ... and no wake-up is sent
    assert [r.id for r in released] == [after.id]
    assert redis.zscore(keys.RELEASED, after.id) is not None
    wait_until(lambda: client.job(after.id).state is JobState.SUCCEEDED, timeout=20, what="the janitor's wake-up")
    wait_until(lambda: redis.zscore(keys.RELEASED, after.id) is None, timeout=5, what="the released entry to go")


def test_after_on_the_command_line(cluster: list[WorkerProc], client: RedisClient, settings: Settings) -> None:
    run(client, Op.LAUNCH, "a[1-2]", memory_mib=32, disk_gib=0)
    first = json.loads(run_cli(settings, "--json", "vm", "pause", "a1").stdout)
    second = run_cli(settings, "--json", "vm", "pause", "a2", "--after", str(first["id"]), "--wait")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["after"] == [first["id"]]
    bad = run_cli(settings, "vm", "pause", "a2", "--after", "x1")
    assert bad.returncode == 2 and "bad job id" in bad.stderr
    unknown = run_cli(settings, "vm", "resume", "a2", "--after", "99999999")
    assert unknown.returncode == 3 and "no job 99999999" in unknown.stderr


def test_a_delayed_job_starts_after_its_delay_once_its_dependencies_are_met(cluster: list[WorkerProc],
                                                                           client: RedisClient) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "w[1-2]", memory_mib=32, disk_gib=0)
    [first] = client.submit(ops(Op.PAUSE, ns, "w1"))
    [later] = client.submit(ops(Op.PAUSE, ns, "w2"), SubmitOptions(after=[first.id], delay_s=2))
    [other] = run(client, Op.TAG, "w2", set={"k": "v"})  # the VM's other jobs don't wait for it
    wait_until(lambda: client.job(later.id).not_before is not None, what="the dependency to be met")
    held = client.job(later.id)
    assert held.state is JobState.QUEUED and held.held and held.not_before is not None
    done = client.wait([first.id, later.id], timeout=30)
    assert [j.state for j in done] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    assert done[0].finished_at is not None and done[1].started_at is not None
    waited = (done[1].started_at - done[0].finished_at).total_seconds()
    assert 2 <= waited < 2 + 2 * 1.5 + 1, waited  # the delay, then at most a janitor's interval or two
    assert done[1].seq > other.seq
    with pytest.raises(InvalidInput, match="launch jobs can't wait"):
        client.submit(ops(Op.LAUNCH, ns, "w9", memory_mib=32), SubmitOptions(delay_s=1))
