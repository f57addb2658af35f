"""Bulk commands: one parent job over one child per VM; counts, retry of the failed, cancel, tag selectors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis import Redis

from orchestrator.control.locks import LockManager, vm_lock
from orchestrator.model.errors import InvalidInput, NotFound
from orchestrator.model.operation import Op
from orchestrator.model.records import BulkOp, Job, JobState, VmState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient, SubmitOptions
from orchestrator.store import keys

from .conftest import WorkerProc, ops, run_cli, wait_until


def run(client: RedisClient, op: Op, target: str, **params: object) -> list[Job]:
    jobs = client.submit(ops(op, client.settings.namespace, target, **params))
    return client.wait([j.id for j in jobs], timeout=60)


@contextmanager
def vm_held(settings: Settings, ns: str, vm: str) -> Iterator[None]:
    """Another holder keeps the VM's lock: the VM's jobs wait (state ``waiting``)."""
    other = LockManager(settings.resolved_redis_url(), owner="test-holder", expire=4)
    try:
        with other.hold(vm_lock(ns, vm), timeout=5):
            yield
    finally:
        other.close()


def test_a_bulk_command_has_a_parent_whose_state_follows_its_children(cluster: list[WorkerProc],
                                                                      client: RedisClient) -> None:
    ns = client.settings.namespace
    launched = run(client, Op.LAUNCH, "b[1-4]", memory_mib=32, disk_gib=0)
    assert all(j.state is JobState.SUCCEEDED for j in launched)
    parent_id = launched[0].parent
    assert parent_id is not None and all(j.parent == parent_id for j in launched)
    [parent] = client.wait([parent_id], timeout=10)
    assert parent.op is BulkOp.BULK and parent.vm == "" and parent.host == "" and parent.state is JobState.SUCCEEDED
    assert parent.children == {"total": 4, "pending": 0, "succeeded": 4, "failed": 0, "canceled": 0}
    assert parent.started_at is not None and parent.finished_at is not None
    assert [c.id for c in client.children(parent_id)] == [j.id for j in launched]

    run(client, Op.KILL, "b[1,2]")
    paused = run(client, Op.PAUSE, "b[1-4]")  # b1, b2 are shut off: their pause fails
    assert [j.state for j in paused] == [JobState.FAILED, JobState.FAILED, JobState.SUCCEEDED, JobState.SUCCEEDED]
    [parent] = client.wait([paused[0].parent or 0], timeout=10)
    assert parent.state is JobState.FAILED and parent.error is not None
    assert parent.error.code == "children_failed" and "2 of 4" in parent.error.message
    assert parent.children is not None and parent.children["failed"] == 2

    run(client, Op.START, "b[1,2]")
    retried = client.retry(parent.id)
    assert [j.vm for j in retried] == ["b1", "b2"]
    assert [j.retry_of for j in retried] == [paused[0].id, paused[1].id]
    new_parent = client.job(retried[0].parent or 0)
    assert new_parent.id != parent.id and new_parent.retry_of == parent.id
    done = client.wait([j.id for j in retried] + [new_parent.id], timeout=60)
    assert all(j.state is JobState.SUCCEEDED for j in done)
    assert all(client.vm(ns, f"b{i}").state is VmState.PAUSED for i in range(1, 5))
    assert client.job(parent.id).state is JobState.FAILED  # history is not rewritten

    with pytest.raises(InvalidInput, match="no failed job"):
        client.retry(new_parent.id)
    with pytest.raises(InvalidInput, match="succeeded"):
        client.retry(done[0].id)


def test_retry_of_one_failed_job_is_a_new_linked_job(cluster: list[WorkerProc], client: RedisClient) -> None:
    run(client, Op.LAUNCH, "r1", memory_mib=32, disk_gib=0)
    run(client, Op.KILL, "r1")
    [failed] = run(client, Op.PAUSE, "r1")
    assert failed.state is JobState.FAILED and failed.parent is None
    run(client, Op.START, "r1")
    [again] = client.retry(failed.id)
    assert again.id != failed.id and again.retry_of == failed.id and again.op is Op.PAUSE and again.parent is None
    assert client.wait([again.id], timeout=30)[0].state is JobState.SUCCEEDED


def test_cancel_of_a_parent_cancels_the_children_not_yet_started(cluster: list[WorkerProc], client: RedisClient,
                                                                 base_settings: Settings) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "k[1-3]", memory_mib=32, disk_gib=0)
    with vm_held(base_settings, ns, "k1"):
        jobs = client.submit(ops(Op.PAUSE, ns, "k[1-3]"))
        parent_id = jobs[0].parent or 0
        wait_until(lambda: client.job(jobs[0].id).state is JobState.WAITING, what="k1's pause to wait for the lock")
        wait_until(lambda: all(client.job(j.id).state.final for j in jobs[1:]), what="k2, k3 paused")
        parent = client.cancel(parent_id)
        assert client.job(jobs[0].id).state is JobState.CANCELED
    done = client.wait([j.id for j in jobs] + [parent_id], timeout=30)
    assert [j.state for j in done] == [JobState.CANCELED, JobState.SUCCEEDED, JobState.SUCCEEDED, JobState.CANCELED]
    parent = done[-1]
    assert parent.children == {"total": 3, "pending": 0, "succeeded": 2, "failed": 0, "canceled": 1}
    assert client.vm(ns, "k1").state is VmState.RUNNING


def test_a_bulk_batch_is_accepted_whole_or_not_at_all(cluster: list[WorkerProc], client: RedisClient,
                                                      redis: Redis) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "w[1-2]", memory_mib=32, disk_gib=0)
    before = redis.zcard(keys.jobs(ns))
    with pytest.raises(NotFound):
        client.submit(ops(Op.PAUSE, ns, "w[1-3]"))  # w3 does not exist
    with pytest.raises(NotFound, match="no job 999999"):
        client.submit(ops(Op.PAUSE, ns, "w[1-2]"), SubmitOptions(after=[999999]))
    assert redis.zcard(keys.jobs(ns)) == before
    assert all(not redis.exists(keys.vm_mailbox(ns, f"w{i}")) for i in (1, 2))


def test_tag_selectors_and_lists_on_the_command_line(cluster: list[WorkerProc], client: RedisClient,
                                                     settings: Settings) -> None:
    ns = client.settings.namespace
    run(client, Op.LAUNCH, "web[1-3]", memory_mib=32, disk_gib=0, tags={"role": "web"})
    run(client, Op.LAUNCH, "db1", memory_mib=32, disk_gib=0, tags={"role": "db"})
    proc = run_cli(settings, "--json", "vm", "pause", "--tag", "role=web", "--wait")
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(proc.stdout)
    assert sorted(j["vm"] for j in jobs) == ["web1", "web2", "web3"]
    assert len({j["parent"] for j in jobs}) == 1 and jobs[0]["parent"] is not None
    assert client.vm(ns, "db1").state is VmState.RUNNING

    shown = run_cli(settings, "--json", "job", "show", str(jobs[0]["parent"]))
    parent = json.loads(shown.stdout)
    assert parent["op"] == "bulk" and parent["children"]["succeeded"] == 3 and parent["by_state"] == {"succeeded": 3}

    narrowed = run_cli(settings, "--json", "vm", "resume", "web[1-2],db1", "--tag", "role=web", "--wait")
    assert narrowed.returncode == 0, narrowed.stderr
    assert sorted(j["vm"] for j in json.loads(narrowed.stdout)) == ["web1", "web2"]

    none = run_cli(settings, "vm", "pause", "--tag", "role=nothing")
    assert none.returncode == 3 and "no VM with tags role=nothing" in none.stderr
    missing = run_cli(settings, "vm", "pause")
    assert missing.returncode == 2 and "no VM given" in missing.stderr

    run(client, Op.KILL, "web3")
    failing = run_cli(settings, "vm", "pause", "web[1-3]", "--wait")  # web3 is shut off: its pause fails
    assert failing.returncode == 1
    assert "1 failed" in failing.stdout and "invalid_state" in failing.stdout
    parent_id = client.job(int(failing.stdout.split()[1])).id
    shown_text = run_cli(settings, "job", "show", str(parent_id))
    assert "1 failed" in shown_text.stdout and "invalid_state" in shown_text.stdout


def test_a_wake_up_the_broker_refuses_fails_its_job_and_the_rest_of_the_batch_runs(
        cluster: list[WorkerProc], client: RedisClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's messages go out over one producer; one refused message fails its own job only."""
    run(client, Op.LAUNCH, "refused[1-3]", memory_mib=32)
    send_task = client.celery.send_task

    def refuse_refused2(name: str, args: list[object], **kw: object) -> object:
        if args[1] == "refused2":
            raise ConnectionError("broker went away")
        return send_task(name, args=args, **kw)

    monkeypatch.setattr(client.celery, "send_task", refuse_refused2)
    jobs = run(client, Op.PAUSE, "refused[1-3]")
    by_vm = {j.vm: j for j in jobs}
    assert by_vm["refused1"].state is JobState.SUCCEEDED and by_vm["refused3"].state is JobState.SUCCEEDED
    failed = by_vm["refused2"]
    assert failed.state is JobState.FAILED and failed.error is not None
    assert "could not enqueue: broker went away" in failed.error.message
    monkeypatch.undo()
    run(client, Op.DELETE, "refused[1-3]")
