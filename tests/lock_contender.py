"""A separate process contending for locks (used by test_locks.py).

usage: lock_contender.py REDIS_URL ROUNDS HOLD_S EXPIRE LOCK_NAME[,LOCK_NAME...]

Each round takes every named lock (declared in the given order; the lock module sorts
them) and, inside, checks mutual exclusion with a Redis counter that must read 1.
Prints "ready" once connected, "done N" at the end.
"""

from __future__ import annotations

import sys
import time

from redis import Redis

from orchestrator.control.locks import Level, LockManager, LockName

url, rounds, hold_s, expire, names = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
locks = [LockName(Level(int(n.split(":", 1)[0])), n.split(":", 1)[1]) for n in names.split(",")]
manager = LockManager(url, owner="contender", expire=expire)
counter = Redis.from_url(url, decode_responses=True)
print("ready", flush=True)
for _ in range(rounds):
    with manager.hold(*locks, timeout=60) as holding:
        inside = counter.incr("test:inside")
        if inside != 1:
            print(f"OVERLAP {inside}", flush=True)
            sys.exit(3)
        holding.check()
        time.sleep(hold_s)
        counter.decr("test:inside")
print(f"done {rounds}", flush=True)
