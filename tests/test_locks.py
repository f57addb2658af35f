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

from orchestrator.control.locks import LockManager, cmd_lock, held, host_lock, other_lock, require, vm_lock, vms_lock
from orchestrator.model.errors import FencedOut, LockLost, LockOrderError, LockTimeout
from orchestrator.store import keys
from orchestrator.store.jobstore import Store

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
        assert len({holding.fence(n).token for n in wanted}) >= 1
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
