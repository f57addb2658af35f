"""The lock hierarchy (guarantee 2) and lock loss/fencing (guarantee 3), with real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from redis import Redis

from orchestrator.control.locks import (
    Level,
    LockManager,
    cmd_lock,
    declared_names,
    held,
    host_lock,
    other_lock,
    require,
    vm_lock,
    vms_lock,
)
from orchestrator.model.errors import FencedOut, LockLost, LockOrderError, LockTimeout
from orchestrator.model.operation import PARAMS, Op, Operation, TargetedOp
from orchestrator.model.records import Job
from orchestrator.services.client import RedisClient
from orchestrator.services.schedules import ScheduleSpec
from orchestrator.store import keys
from orchestrator.store.jobstore import Store
from worker import runner
from worker.handlers import HANDLERS, operation_of

from .conftest import RedisServer, wait_until

CONTENDER = Path(__file__).with_name("lock_contender.py")
T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in another thread: a context of its own, holding nothing (like another worker thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@pytest.fixture
def manager(redis_server: RedisServer, redis: Redis) -> Iterator[LockManager]:
    m = LockManager(redis_server.url, owner="test", expire=3)
    yield m
    m.close()
    assert not list(redis.scan_iter("lock:*")), "a lock was left held"
    for key in redis.scan_iter("test:*"):
        redis.delete(key)


def test_locks_are_taken_in_hierarchy_order_and_released_in_reverse(manager: LockManager, redis: Redis) -> None:
    wanted = [host_lock("h1"), vm_lock("ns", "b"), vm_lock("ns", "a"), vms_lock("ns"), cmd_lock("ns")]
    with manager.hold(*wanted, timeout=5) as holding:
        assert held() == (cmd_lock("ns"), vms_lock("ns"), vm_lock("ns", "a"), vm_lock("ns", "b"), host_lock("h1"))
        assert all(redis.exists(keys.lock_key(n.name)) for n in wanted)
        for n in wanted:  # each lock's token is the newest its fencing counter handed out
            fence = holding.fence(n)
            assert fence.key == keys.fence(n.name) and fence.token == int(redis.get(fence.key) or 0) > 0
    assert held() == ()
    assert not list(redis.scan_iter("lock:*"))


@pytest.mark.parametrize(("first", "then"), [
    (vm_lock("ns", "a"), cmd_lock("ns")),        # a higher level under a lower one
    (vm_lock("ns", "a"), vms_lock("ns")),
    (host_lock("h1"), vm_lock("ns", "a")),
    (vm_lock("ns", "b"), vm_lock("ns", "a")),    # same level, name out of order
    (vm_lock("ns", "a"), vm_lock("ns", "a")),    # not reentrant: would deadlock on itself
])
def test_lock_order_violation_raises_at_once(manager: LockManager, redis: Redis, first: object, then: object) -> None:
    with manager.hold(first, timeout=5):  # type: ignore[arg-type]
        keys_before = set(redis.scan_iter("lock:*"))
        started = time.monotonic()
        with pytest.raises(LockOrderError, match="lock order violation"), \
                manager.hold(then, timeout=5):  # type: ignore[arg-type]
            pass
        assert time.monotonic() - started < 0.5, "a violation must raise before waiting for anything"
        assert set(redis.scan_iter("lock:*")) == keys_before, "a violation must not touch Redis"
        assert held() == (first,)
    assert held() == ()


def test_nested_holds_in_order_are_fine(manager: LockManager) -> None:
    with manager.hold(cmd_lock("ns"), timeout=5), manager.hold(vms_lock("ns"), timeout=5), \
            manager.hold(vm_lock("ns", "a"), vm_lock("ns", "b"), timeout=5):
        require(vm_lock("ns", "a"))
        assert len(held()) == 4
    with pytest.raises(LockOrderError):
        require(vm_lock("ns", "a"))


def test_locks_are_released_when_the_body_raises(manager: LockManager, redis: Redis) -> None:
    with pytest.raises(RuntimeError), manager.hold(vm_lock("ns", "a"), host_lock("h"), timeout=5):
        raise RuntimeError("boom")
    assert held() == ()
    assert not list(redis.scan_iter("lock:*"))


def _contender(url: str, rounds: int, hold_s: float, names: list[str], expire: int = 3) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(CONTENDER), url, str(rounds), str(hold_s), str(expire),
                             ",".join(names)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=CONTENDER.parent.parent)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def test_opposite_declaration_orders_do_not_deadlock(redis_server: RedisServer, redis: Redis) -> None:
    """Two processes declare the same two locks in opposite orders, many times: both finish, never together."""
    a, b = "4:vmorch:test:lock-a", "4:vmorch:test:lock-b"
    procs = [_contender(redis_server.url, 40, 0.002, [a, b]), _contender(redis_server.url, 40, 0.002, [b, a])]
    try:
        for proc in procs:
            out, errors = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{out}\n{errors}"
            assert "done 40" in out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not list(redis.scan_iter("lock:*"))
    redis.delete("test:inside")


def test_a_lock_is_renewed_past_its_expiry(manager: LockManager, redis_server: RedisServer) -> None:
    other = LockManager(redis_server.url, owner="other", expire=3)
    try:
        with manager.hold(vm_lock("ns", "long"), timeout=5) as holding:
            time.sleep(4.5)  # past the 3 s expiry: only renewal keeps it
            holding.check()
            with pytest.raises(LockTimeout, match="held by test:"):
                in_thread(lambda: other.hold(vm_lock("ns", "long"), timeout=1.5).__enter__())
    finally:
        other.close()


def test_a_lost_lock_is_noticed_before_the_next_side_effect(manager: LockManager, redis: Redis,
                                                            redis_server: RedisServer) -> None:
    name = vm_lock("ns", "lost")
    store = Store(redis)
    with manager.hold(name, timeout=5) as holding:
        old_fence = holding.fence(name)
        redis.delete(keys.lock_key(name.name))  # the lock expires behind the holder's back ...
        thief = LockManager(redis_server.url, owner="thief", expire=3)
        stolen = in_thread(lambda: thief.hold(name, timeout=5).__enter__())  # someone else takes it
        assert stolen.fence(name).token > old_fence.token
        wait_until(lambda: holding.locks[0].lost is not None, timeout=3, what="the renewer to notice")
        with pytest.raises(LockLost, match="lost lock"):
            holding.check()
        # a write with the stale token is refused, whatever the holder believes
        redis.hset(keys.job(999_999), mapping={"id": 999_999, "op": "pause", "state": "running", "namespace": "ns",
                                               "vm": "lost", "seq": 1})
        job = store.get_job(999_999)
        with pytest.raises(FencedOut):
            store.begin(job, old_fence, "stale-worker")
        assert store.begin(job, stolen.fence(name), "new-worker") == 1
        redis.delete(keys.lock_key(name.name))  # the thief's thread is gone; drop what it held
        thief.close()
    redis.delete(keys.job(999_999), keys.events("ns"))


def test_a_killed_holders_lock_is_taken_within_expiry_plus_one_second(redis_server: RedisServer,
                                                                      manager: LockManager) -> None:
    holder = _contender(redis_server.url, 1, 3600, ["3:vmorch:vm:ns:victim"], expire=3)
    try:
        wait_until(lambda: manager.client.exists("lock:vmorch:vm:ns:victim"), what="the holder to take the lock")
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
        killed = time.monotonic()
        with manager.hold(vm_lock("ns", "victim"), timeout=10):
            waited = time.monotonic() - killed
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
        manager.client.delete("test:inside")
    assert waited <= 3 + 1.2, f"took {waited:.2f}s to notice a dead holder (expiry 3 s)"


def test_fencing_tokens_only_go_up(manager: LockManager) -> None:
    tokens = []
    for _ in range(5):
        with manager.hold(other_lock("test:fence"), timeout=5) as holding:
            tokens.append(holding.fence(other_lock("test:fence")).token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 5


# -- locks declared once per handler; require() at the # LOCK: sites -----------------------


def test_declared_locks_are_taken_level_by_level_and_held_ones_are_not_taken_again(manager: LockManager) -> None:
    declared = {Level.OTHER: [host_lock("h2"), host_lock("h1")], Level.VM: [vm_lock("ns", "a")]}
    assert declared_names(declared) == [vm_lock("ns", "a"), host_lock("h1"), host_lock("h2")]
    with manager.hold(vm_lock("ns", "a"), timeout=5):  # the runner's: held for the whole mailbox
        with manager.hold_declared(declared, timeout=5) as extra:
            assert [h.name for h in extra.locks] == [host_lock("h1"), host_lock("h2")]
            assert held() == (vm_lock("ns", "a"), host_lock("h1"), host_lock("h2"))
        assert held() == (vm_lock("ns", "a"),)
    with pytest.raises(LockOrderError, match="declared at vm"):
        declared_names({Level.VM: [host_lock("h1")]})


def test_every_handler_declares_its_vm_lock_and_takes_its_ops_params() -> None:
    for op, handler in HANDLERS.items():
        assert handler.params is PARAMS[op], op
        params: dict[str, object] = {"to": "h2", "source": "h2", "name": "s", "set": {"k": "v"}, "memory_mib": 64,
                                     "command": ["true"], "path": "/tmp/f", "direction": "in", "data": ""}
        operation = Operation.build(op, "ns", "web1", **{k: v for k, v in params.items()
                                                         if k in PARAMS[op].model_fields})
        job = Job.model_validate({"id": 5, "op": op, "namespace": "ns", "vm": "web1", "host": "h1", "state": "running",
                                  "seq": 1, "submitted_at": None, "started_at": None, "finished_at": None,
                                  "attempts": 1, "error": None, "result": None,
                                  "params": operation.params.model_dump(mode="json")})
        ctx = handler.context(job, operation_of(job), None, None, lambda: None)  # type: ignore[arg-type]
        assert ctx.params == operation.params and type(ctx.params) is PARAMS[op]
        declared = handler.locks(ctx)
        assert declared[Level.VM] == [vm_lock("ns", "web1")], op
        if op in (Op.MOVE_OUT, Op.MOVE_IN):
            assert sorted(declared[Level.OTHER]) == [host_lock("h1"), host_lock("h2")]
        else:
            assert set(declared) == {Level.VM}, op


def test_a_function_that_relies_on_a_lock_raises_when_called_without_it(client: RedisClient) -> None:
    """The ``# LOCK:`` sites check what the calling thread holds: a caller that forgot the lock is
    stopped before it reads or writes anything."""
    ns = client.settings.namespace
    job = Job.model_validate({"id": 7, "op": "pause", "namespace": ns, "vm": "web1", "host": "h1",
                              "state": "queued", "seq": 1, "submitted_at": None, "started_at": None,
                              "finished_at": None, "attempts": 0, "error": None, "result": None, "params": {}})
    # the runner: running a job of the mailbox, and reading its VM, assume the VM's lock
    with pytest.raises(LockOrderError, match=f"vmorch:vm:{ns}:web1 must be held"):
        runner._run_one(None, None, None, job)  # type: ignore[arg-type]
    with pytest.raises(LockOrderError, match="must be held"):
        runner._load_vm(None, None, job, None)  # type: ignore[arg-type]
    # the submit path: placement assumes cmd, vms and the candidate hosts' locks
    with pytest.raises(LockOrderError, match=f"vmorch:cmd:{ns} must be held"):
        client._plan(ns, [], locked=set())
    # schedules: every write assumes the schedule's lock
    store = client._schedules
    with pytest.raises(LockOrderError, match=f"schedule:{ns}:s1 must be held"):
        store.due(ns, "s1", 0.0)
    with pytest.raises(LockOrderError, match=f"schedule:{ns}:s1 must be held"):
        store.claim(ns, "s1", 1.0)
    with pytest.raises(LockOrderError, match="must be held"):
        store.remove(ns, "s1")
    with pytest.raises(LockOrderError, match="must be held"):
        client._schedules.add(ScheduleSpec(name="s1", namespace=ns, every="1h", operations=[
            TargetedOp(op=Op.PAUSE, target="web1")]), "test")
    with store.locked(ns, "s1"):
        assert store.due(ns, "s1", 0.0) is None  # held: it runs (and finds no such schedule)
        assert store.claim(ns, "s1", 1.0) is False
    assert client.schedules(ns) == []
