"""The store's Lua scripts, each loaded by itself and called against the real Redis fixture.

Every test asserts the keyspace after the call: a refusal writes nothing, a final job stays as it
was, and settling a job releases (or fails) the jobs that wait for it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from importlib.resources import files
from typing import Any

import pytest
from redis import Redis

from orchestrator.model.errors import (
    AlreadyExists,
    ChildrenFailed,
    DependencyFailed,
    EnqueueFailed,
    FencedOut,
    InvalidInput,
    NotFound,
    VmorchError,
)
from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import FINAL_STATES, ImageOp, Job, JobState, Quota
from orchestrator.store import keys, refusals, scripts
from orchestrator.store.images import ImageRecords
from orchestrator.store.jobstore import BatchEntry, Fence, Store, Submitted
from orchestrator.store.scripts import Keys, settle_keys

LUA = {path.name: path.read_text() for path in (files("orchestrator.store") / "lua").iterdir()
       if path.name.endswith(".lua")}


def code_of(text: str) -> str:
    """A Lua file without its comments."""
    return "\n".join(line.split("--")[0] for line in text.splitlines())


def run(redis: Redis, name: str, ks: Keys, args: dict[str, Any]) -> Any:
    """Script ``name`` loaded by itself (its helpers and its file), called once."""
    return scripts.call(redis.register_script(scripts.source(name)), ks, args)


def snapshot(redis: Redis, ns: str) -> dict[str, object]:
    """Every key of the namespace, its jobs' keys, and the shared keys the scripts write, with their values."""
    ids = [int(str(i)) for i in redis.zrange(keys.jobs(ns), 0, -1)]
    names = set(redis.scan_iter(f"*{ns}*")) | {keys.JOB_NEXT}
    names |= {k for i in ids for k in (keys.job(i), keys.job_children(i), keys.job_dependents(i))}
    out: dict[str, object] = {k: value(redis, k) for k in sorted(names)}
    for shared in (keys.RELEASED, keys.DELAYED):
        out[shared] = {i: redis.zscore(shared, i) for i in ids}
    return out


def value(redis: Redis, key: str) -> object:
    kind = str(redis.type(key))
    readers: dict[str, Callable[[str], object]] = {
        "string": redis.get, "hash": redis.hgetall, "set": lambda k: sorted(redis.smembers(k)),
        "zset": lambda k: redis.zrange(k, 0, -1, withscores=True), "list": lambda k: redis.lrange(k, 0, -1),
        "stream": redis.xrange, "none": lambda k: None}
    return (kind, readers[kind](key))


@pytest.fixture
def store(redis: Redis, ns: str) -> Iterator[Store]:
    yield Store(redis)
    ids = [int(str(i)) for i in redis.zrange(keys.jobs(ns), 0, -1)]
    for i in ids:
        redis.delete(keys.job(i), keys.job_children(i), keys.job_dependents(i))
    if ids:
        redis.zrem(keys.RELEASED, *ids)
        redis.zrem(keys.DELAYED, *ids)
    for key in redis.scan_iter(f"*{ns}*"):
        redis.delete(key)
    redis.srem(keys.NAMESPACES, ns)


def launch(store: Store, ns: str, *names: str) -> list[Submitted]:
    entries = [BatchEntry(Operation.build(Op.LAUNCH, ns, n, memory_mib=256, vcpus=2), host=f"h-{ns}") for n in names]
    return store.submit_batch(entries)[1]


def submit(store: Store, ns: str, op: Op, vm: str, **kw: Any) -> Submitted:
    return store.submit_batch([BatchEntry(Operation.build(op, ns, vm))], **kw)[1][0]


def fence(redis: Redis, ns: str, vm: str, token: int = 1) -> Fence:
    f = Fence(keys.fence(f"{keys.PREFIX}:vm:{ns}:{vm}"), token)
    redis.set(f.key, token)
    return f


def begin(redis: Redis, job: Job, f: Fence) -> Any:
    ks = Keys(job=keys.job(job.id), fence=f.key, updates=keys.UPDATES, events=keys.events(job.namespace))
    return run(redis, "begin", ks, {"token": f.token, "id": job.id, "by": "test"})


def finish(redis: Redis, job: Job, f: Fence, state: str, *, update: dict[str, str] | None = None) -> Any:
    ks = Keys(job=keys.job(job.id), fence=f.key, mailbox=keys.vm_mailbox(job.namespace, job.vm),
              vm=keys.vm(job.namespace, job.vm), vms=keys.vms(job.namespace), host_vms=keys.host_vms(job.host),
              events=keys.events(job.namespace), **settle_keys())
    args: dict[str, Any] = {"token": f.token, "id": job.id, "state": state, "vm": job.vm, "by": "test",
                            "delete": False, "error": "", "result": "", "detail": "", "adjust": []}
    if update:
        args.update(update=update, update_text=json.dumps(update))
    return run(redis, "finish", ks, args)


def cancel(redis: Redis, job: Job) -> Any:
    ks = Keys(job=keys.job(job.id), mailbox=keys.vm_mailbox(job.namespace, job.vm),
              events=keys.events(job.namespace), **settle_keys())
    return run(redis, "cancel", ks, {"id": job.id, "by": "test", "error": ""})


# -- the files ------------------------------------------------------------------------


def test_every_script_loads_by_itself(redis: Redis) -> None:
    for name in scripts.HELPERS:
        sha = redis.script_load(scripts.source(name))
        assert redis.script_exists(sha) == [True], name
    used = {part for parts in scripts.HELPERS.values() for part in parts} | set(scripts.HELPERS)
    assert {f"{n}.lua" for n in used} == set(LUA), "a .lua file no script uses, or a script without its file"


def test_no_key_is_spelled_in_lua() -> None:
    for name, text in LUA.items():
        code = code_of(text)
        assert keys.PREFIX not in code, name
        for piece in ("job:", "vm:", "host:", "events:", ":seq", ":mailbox", ":dependents", ":children", ":vms"):
            assert piece not in code, f"{name} builds a key with {piece!r}"


def test_lua_derives_the_keys_keys_py_builds(redis: Redis) -> None:
    assert keys.pattern(keys.vm_mailbox, 2) == [f"{keys.PREFIX}:vm:", ":", ":mailbox"]
    text = LUA["args.lua"] + LUA["key.lua"] + """
return {key(P.job, 12), key(P.job_dependents, 12), key(P.vm_mailbox, 'ns-1', 'web1'), key(P.host_vms, 'h1'),
  key(P.events, 'ns-1')}"""
    derived = scripts.call(redis.register_script(text), Keys(), {})
    assert derived == [keys.job(12), keys.job_dependents(12), keys.vm_mailbox("ns-1", "web1"), keys.host_vms("h1"),
                       keys.events("ns-1")]


def test_the_final_states_come_from_records() -> None:
    assert scripts._constants()["final"] == sorted(s.value for s in FINAL_STATES)
    for name, text in LUA.items():
        assert not re.search(r"==\s*'(failed|canceled)'\s+or", code_of(text)), f"{name} lists final states"


def test_every_error_code_in_lua_has_a_class() -> None:
    for name, text in LUA.items():
        code = code_of(text)
        for refusal in re.findall(r"refuse\('(\w+)', \{what = '(\w+)'", code):
            assert refusal in refusals.REFUSALS, f"{name}: refusal {refusal} has no error"
        assert len(re.findall(r"refuse\('", code)) == len(re.findall(r"refuse\('\w+', \{what = '", code)), name
        for written in re.findall(r"code = '(\w+)'", code):  # a job's error, stored in its record
            assert type(VmorchError.from_dict({"code": written, "message": ""})) is not VmorchError, written
    assert VmorchError.from_dict({"code": "children_failed"}).__class__ is ChildrenFailed
    assert VmorchError.from_dict({"code": "dependency_failed"}).__class__ is DependencyFailed


@pytest.mark.parametrize(("refusal", "details", "cls", "exit_code"), [
    (("fenced_out", "lock"), {"token": 1, "current": "2"}, FencedOut, 1),
    (("not_found", "job"), {"job": 7}, NotFound, 3),
    (("not_found", "vm"), {"namespace": "n", "vm": "v"}, NotFound, 3),
    (("not_found", "dependency"), {"job": 7}, NotFound, 3),
    (("not_found", "namespace"), {"namespace": "n"}, NotFound, 3),
    (("already_exists", "vm"), {"namespace": "n", "vm": "v"}, AlreadyExists, 2),
    (("invalid_input", "moved"), {"namespace": "n", "vm": "v", "host": "h"}, InvalidInput, 2),
    (("invalid_input", "dependency_failed"), {"job": 7, "state": "failed"}, InvalidInput, 2),
])
def test_refusal_classes(refusal: tuple[str, str], details: dict[str, Any], cls: type[VmorchError],
                         exit_code: int) -> None:
    err = refusals.REFUSALS[refusal](details)
    assert type(err) is cls and err.code == refusal[0] and err.exit_code == exit_code and err.message and err.hint
    # what crosses the API comes back as the same class (the HTTP client raises what the Redis client raises)
    assert type(VmorchError.from_dict(err.to_dict())) is cls


# -- refusals write nothing -----------------------------------------------------------


def test_a_stale_fence_is_refused_and_nothing_is_written(store: Store, redis: Redis, ns: str) -> None:
    [a] = launch(store, ns, "a")
    current = fence(redis, ns, "a", token=2)
    stale = Fence(current.key, 1)
    before = snapshot(redis, ns)
    with pytest.raises(FencedOut):
        begin(redis, a.job, stale)
    with pytest.raises(FencedOut):
        finish(redis, a.job, stale, "succeeded")
    with pytest.raises(FencedOut):
        run(redis, "update_vm", Keys(vm=keys.vm(ns, "a"), fence=stale.key, events=keys.events(ns)),
            {"token": 1, "fields": {"state": "running"}, "fields_text": "{}", "vm": "a", "by": "test"})
    assert snapshot(redis, ns) == before
    assert begin(redis, a.job, current) == [1, 1]
    assert redis.hget(keys.job(a.id), "state") == "running"


def test_a_missing_job_is_refused_and_nothing_is_written(store: Store, redis: Redis, ns: str) -> None:
    [a] = launch(store, ns, "a")
    ghost = a.job.model_copy(update={"id": a.id + 1_000_000})
    f = fence(redis, ns, "a")
    before = snapshot(redis, ns)
    with pytest.raises(NotFound, match=f"no job {ghost.id}"):
        begin(redis, ghost, f)
    with pytest.raises(NotFound, match=f"no job {ghost.id}"):
        finish(redis, ghost, f, "failed")
    with pytest.raises(NotFound, match=f"no job {ghost.id}"):
        cancel(redis, ghost)
    assert snapshot(redis, ns) == before and not redis.exists(keys.job(ghost.id))


def test_a_final_job_stays_as_it_is(store: Store, redis: Redis, ns: str) -> None:
    [a] = launch(store, ns, "a")
    f = fence(redis, ns, "a")
    assert begin(redis, a.job, f) == [1, 1]
    assert finish(redis, a.job, f, "succeeded", update={"state": "running"}) == [1]
    assert redis.hget(keys.vm(ns, "a"), "state") == "running"
    assert not redis.zrange(keys.vm_mailbox(ns, "a"), 0, -1)
    before = snapshot(redis, ns)
    assert begin(redis, a.job, f) == [0, "succeeded"]
    assert finish(redis, a.job, f, "failed") == [0]
    assert cancel(redis, a.job) == ["succeeded"]
    assert snapshot(redis, ns) == before


def test_a_quota_change_merges_on_the_server_and_never_makes_a_namespace(store: Store, redis: Redis,
                                                                        ns: str) -> None:
    with pytest.raises(NotFound, match=f"no namespace '{ns}'"):
        store.change_namespace_quota(ns, Quota(vms=1))
    assert not redis.exists(keys.namespace(ns))
    launch(store, ns, "a")  # a first launch makes its namespace
    assert store.change_namespace_quota(ns, Quota(vms=3, vcpus=8)).quota == Quota(vms=3, vcpus=8)
    changed = store.change_namespace_quota(ns, Quota(memory_mib=512, vcpus=0))  # 0 clears; vms stays
    assert (changed.quota, changed.vms) == (Quota(vms=3, memory_mib=512), 1)
    assert store.change_namespace_quota(ns, Quota(disk_gib=2), replace=True).quota == Quota(disk_gib=2)


def test_a_batch_with_a_missing_vm_writes_nothing(store: Store, redis: Redis, ns: str) -> None:
    launch(store, ns, "a")
    before = snapshot(redis, ns)
    batch = [BatchEntry(Operation.build(Op.LAUNCH, ns, "b"), host=f"h-{ns}"),
             BatchEntry(Operation.build(Op.PAUSE, ns, "a")), BatchEntry(Operation.build(Op.PAUSE, ns, "ghost"))]
    with pytest.raises(NotFound, match=f"no VM 'ghost' in namespace '{ns}'") as caught:
        store.submit_batch(batch, parent={"namespace": ns, "params": {}})
    assert caught.value.code == "not_found" and caught.value.exit_code == 3
    with pytest.raises(AlreadyExists, match="VM 'a' already exists"):
        store.submit_batch([BatchEntry(Operation.build(Op.LAUNCH, ns, "a"), host=f"h-{ns}")])
    move = Operation.build(Op.MOVE_OUT, ns, "a", to="elsewhere")
    with pytest.raises(InvalidInput, match="no longer on host 'nowhere'"):
        store.submit_batch([BatchEntry(move, host="elsewhere", source="nowhere")])
    assert snapshot(redis, ns) == before


def test_bad_dependencies_write_nothing(store: Store, redis: Redis, ns: str) -> None:
    [a] = launch(store, ns, "a")
    f = fence(redis, ns, "a")
    finish(redis, a.job, f, "failed")
    before = snapshot(redis, ns)
    with pytest.raises(NotFound, match="no job 99999999 to wait for"):
        submit(store, ns, Op.PAUSE, "a", after={99999999: "ok"})
    with pytest.raises(InvalidInput, match=f"job {a.id} to wait for is already failed"):
        submit(store, ns, Op.PAUSE, "a", after={a.id: "ok"})
    assert snapshot(redis, ns) == before
    doomed = submit(store, ns, Op.PAUSE, "a", after={a.id: "ok"}, fail_on_failed_dep=True)
    assert doomed.job.state == "failed" and doomed.job.error is not None
    assert doomed.job.error.code == DependencyFailed.code


# -- settling -------------------------------------------------------------------------


def test_settle_releases_and_fails_dependents(store: Store, redis: Redis, ns: str) -> None:
    [a] = launch(store, ns, "a")
    f = fence(redis, ns, "a")
    b = submit(store, ns, Op.PAUSE, "a", after={a.id: "ok"})
    c = submit(store, ns, Op.RESUME, "a", after={b.id: "ok"})
    d = submit(store, ns, Op.STOP, "a", after={b.id: "final"})
    assert (b.seq, c.seq, d.seq) == (0, 0, 0)
    assert redis.hgetall(keys.job_dependents(a.id)) == {str(b.id): "ok"}

    done = finish(redis, a.job, f, "succeeded")
    assert done == [1, str(b.id), f"h-{ns}", ns, "a"]  # released: id, host, namespace, vm
    held = redis.hgetall(keys.job(b.id))
    assert held["held"] == "" and int(held["seq"]) > 0
    assert redis.zscore(keys.vm_mailbox(ns, "a"), b.id) == int(held["seq"])
    assert redis.zscore(keys.RELEASED, b.id) is not None
    assert redis.hget(keys.job(c.id), "held") == "1"

    # b fails: c needed it to succeed and fails at once; d only needed it final and is released
    done = finish(redis, store.get_job(b.id), f, "failed")
    assert done[0] == 1 and done[1:] == [str(d.id), f"h-{ns}", ns, "a"]
    failed = store.get_job(c.id)
    assert failed.state == "failed" and failed.error is not None and failed.error.code == DependencyFailed.code
    assert int(redis.hget(keys.job(d.id), "seq") or 0) > 0
    assert not redis.zscore(keys.vm_mailbox(ns, "a"), c.id)


def test_a_parent_is_final_with_its_last_child(store: Store, redis: Redis, ns: str) -> None:
    entries = [BatchEntry(Operation.build(Op.LAUNCH, ns, n), host=f"h-{ns}") for n in ("a", "b")]
    parent, [a, b] = store.submit_batch(entries, parent={"namespace": ns, "params": {}})
    assert parent is not None
    finish(redis, a.job, fence(redis, ns, "a"), "succeeded")
    assert store.get_job(parent).state == "queued"
    finish(redis, b.job, fence(redis, ns, "b"), "failed")
    job = store.get_job(parent)
    assert job.state == "failed" and job.error is not None
    assert type(VmorchError.from_dict(job.error.model_dump())) is ChildrenFailed and "1 of 2" in job.error.message


def test_release_due_and_fail_unsent(store: Store, redis: Redis, ns: str) -> None:
    [a] = launch(store, ns, "a")
    later = submit(store, ns, Op.PAUSE, "a", delay_s=1.0)
    assert later.seq == 0 and redis.zscore(keys.DELAYED, later.id) is not None
    assert run(redis, "release_due", Keys(**settle_keys()), {"by": "test"}) == []  # not due yet
    time.sleep(1.1)
    run(redis, "release_due", Keys(**settle_keys()), {"by": "test"})
    assert redis.zscore(keys.DELAYED, later.id) is None and redis.zscore(keys.vm_mailbox(ns, "a"), later.id)

    ks = Keys(job=keys.job(a.id), mailbox=keys.vm_mailbox(ns, "a"), events=keys.events(ns), **settle_keys())
    error = json.dumps(EnqueueFailed("broker gone").to_dict())
    assert run(redis, "fail_unsent", ks, {"id": a.id, "error": error, "detail": "broker gone", "by": ""}) == []
    job = store.get_job(a.id)
    assert job.state == "failed" and job.error is not None and job.error.code == "enqueue_failed"
    assert redis.zscore(keys.vm_mailbox(ns, "a"), a.id) is None
    before = snapshot(redis, ns)
    assert run(redis, "fail_unsent", ks, {"id": a.id, "error": error, "detail": "again", "by": ""}) == []
    assert snapshot(redis, ns) == before


def test_mark_waiting_and_turn(store: Store, redis: Redis, ns: str) -> None:
    [a] = launch(store, ns, "a")
    ks = Keys(job=keys.job(a.id), updates=keys.UPDATES, events=keys.events(ns))
    assert run(redis, "mark_waiting", ks, {"id": a.id, "by": "test"}) == 1
    assert run(redis, "mark_waiting", ks, {"id": a.id, "by": "test"}) == 0  # only from queued
    rows, job, vm = run(redis, "turn", Keys(mailbox=keys.vm_mailbox(ns, "a"), job=keys.job(a.id),
                                            vm=keys.vm(ns, "a")), {"id": a.id})
    assert rows == [str(a.id), str(a.seq)] and dict(zip(job[::2], job[1::2], strict=True))["state"] == "waiting"
    assert json.loads(vm)["host"] == f"h-{ns}"


def test_a_corrected_memory_or_vcpu_count_moves_the_host_reservation(store: Store, redis: Redis, ns: str) -> None:
    """Reconciliation found the domain at 192 MiB and 1 vCPU (changed outside vmorch): what placement
    counts on the host follows, so a later delete frees exactly what the VM holds."""
    launch(store, ns, "a")
    host = keys.host(f"h-{ns}")
    assert redis.hmget(host, "committed_mib", "committed_vcpus") == ["256", "2"]
    store.update_vm(ns, "a", fence(redis, ns, "a"), {"memory_mib": 192, "vcpus": 1, "state": "shutoff"}, by="sync")
    assert redis.hmget(host, "committed_mib", "committed_vcpus") == ["192", "1"]
    store.update_vm(ns, "a", fence(redis, ns, "a"), {"state": "running"}, by="sync")  # no size: no change
    assert redis.hmget(host, "committed_mib", "committed_vcpus") == ["192", "1"]
    redis.delete(host)


def test_the_last_hosts_removal_deletes_the_image_with_its_history(store: Store, redis: Redis, ns: str) -> None:
    """image_done.lua: the image's record, its hosts and its own history go in one step, with the
    removal of its last host's entry; not before."""
    records, name = ImageRecords(redis, store.scripts), f"img-{ns}"
    history = keys.image_history(name)
    made: list[int] = []
    try:
        parent, jobs = records.submit(name, ImageOp.IMPORT, ["h1", "h2"], params={}, by="test",
                                      record={"source": "http://example.test/i.qcow2", "sha256": "", "format": "qcow2"})
        made += [parent or 0, *(j.id for j in jobs)]
        for job in jobs:
            records.done(job, None, JobState.SUCCEEDED, host_state="ready", by="test")
        assert redis.xlen(history) == 4  # each job: queued, succeeded
        parent, [first, last] = records.submit(name, ImageOp.REMOVE, ["h1", "h2"], params={}, by="test")
        made += [parent or 0, first.id, last.id]
        records.done(first, None, JobState.SUCCEEDED, host_state="", by="test")
        assert redis.hkeys(keys.image_hosts(name)) == ["h2"] and redis.xlen(history) == 7
        records.done(last, None, JobState.SUCCEEDED, host_state="", by="test")
        assert redis.exists(keys.image(name), keys.image_hosts(name), history) == 0
        assert not redis.sismember(keys.IMAGES, name)
        assert redis.hget(keys.job(last.id), "state") == "succeeded"  # the job itself stays, with its own list
    finally:
        redis.srem(keys.IMAGES, name)
        redis.zrem(keys.jobs(keys.IMAGES_NS), *made)
        for i in made:
            redis.delete(keys.job(i), keys.job_children(i), keys.job_history(i))

