"""B4: the lock hierarchy's cost. An uncontended acquire+release next to a bare python-redis-lock
cycle; the hand-off from a releaser to a blocked waiter (both ways); and how long a waiter waits
for the lock of a SIGKILLed holder, next to the lock's expiry."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import redis_lock

from orchestrator.control.locks import LockManager, vm_lock
from orchestrator.store.redisconn import connect_for_locks

from .harness import Env, percentile
from .suite import Row, Sizes, at_most, ms

TARGET = 1.3
HANDOFF_MAX_S = 0.005

HOLDER = """
import sys, time
from orchestrator.control.locks import LockManager, vm_lock
m = LockManager(sys.argv[1], owner="bench-holder", expire=int(sys.argv[2]))
with m.hold(vm_lock("bench", "victim"), timeout=30):
    print("held", flush=True)
    time.sleep(3600)
"""

Hold = Callable[[], AbstractContextManager[object]]


def _cycles(hold: Hold, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with hold():
            pass
        out.append(time.perf_counter() - t)
    return out


def _handoff(releaser: Hold, waiter: Hold) -> float:
    """Seconds from the holder starting its release to the blocked waiter holding the lock."""
    held, waiting, released_at, got_at = threading.Event(), threading.Event(), [0.0], [0.0]

    def wait() -> None:
        held.wait()
        waiting.set()
        with waiter():
            got_at[0] = time.perf_counter()

    th = threading.Thread(target=wait)
    th.start()
    with releaser():
        held.set()
        waiting.wait()
        time.sleep(0.02)  # the waiter is now blocked in Redis
        released_at[0] = time.perf_counter()
    th.join()
    return got_at[0] - released_at[0]


def _recovery(url: str, expire: int) -> float:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(expire)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    time.sleep(expire / 2)  # mid-life: a renewal has happened, the key has about a full expiry left
    waiter = LockManager(url, owner="bench-waiter", expire=expire)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    killed = time.perf_counter()
    with waiter.hold(vm_lock("bench", "victim"), timeout=expire * 3):
        took = time.perf_counter() - killed
    waiter.close()
    return took


def run(env: Env, sizes: Sizes) -> list[Row]:
    ours_a, ours_b = (LockManager(env.url, owner=f"bench{i}", expire=10) for i in range(2))
    bare_a, bare_b = connect_for_locks(env.url), connect_for_locks(env.url)

    def ours(m: LockManager, name: str = "x") -> Hold:
        return lambda: m.hold(vm_lock("bench", name), timeout=30)

    def bare(client: object, name: str = "bare") -> Hold:
        def hold() -> AbstractContextManager[object]:
            return redis_lock.Lock(client, name, expire=10)  # type: ignore[no-any-return]
        return hold

    _cycles(ours(ours_a), 50)
    _cycles(bare(bare_a), 50)
    ours_t, bare_t = [], []
    for _ in range(max(1, sizes.b4_cycles // 100)):  # interleaved blocks
        ours_t += _cycles(ours(ours_a), 100)
        bare_t += _cycles(bare(bare_a), 100)
    o, b = percentile(ours_t, 50), percentile(bare_t, 50)
    rows = [Row("B4", "lock acquire+release p50 (LockManager.hold, fenced)", ms(o),
                f"{ms(b)} bare python-redis-lock", *at_most(o / b, TARGET))]

    ours_h = [_handoff(ours(ours_a, "h"), ours(ours_b, "h")) for _ in range(sizes.b4_handoffs)]
    bare_h = [_handoff(bare(bare_a, "bh"), bare(bare_b, "bh")) for _ in range(sizes.b4_handoffs)]
    o, b = percentile(ours_h, 50), percentile(bare_h, 50)
    rows.append(Row("B4", f"hand-off releaser→waiter p50 (max {ms(max(ours_h))})", ms(o),
                    f"{ms(b)} bare python-redis-lock", o / b, f"≤ {HANDOFF_MAX_S * 1e3:g} ms", o <= HANDOFF_MAX_S))

    expire = sizes.b4_expire
    waits = [_recovery(env.url, expire) for _ in range(sizes.b4_recoveries)]
    worst = max(waits)
    rows.append(Row("B4", f"recovery after SIGKILLed holder, worst of {len(waits)}", f"{worst:.2f} s",
                    f"{expire} s lock expiry", worst / expire, "≤ expiry + 1 s", worst <= expire + 1))
    ours_a.close()
    ours_b.close()
    return rows
