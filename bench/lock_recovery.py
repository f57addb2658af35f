"""B4 (recovery part): how long a waiter waits for a lock whose holder was SIGKILLed, next to
the lock's expiry (the baseline: the time Redis itself needs to forget the holder).

    .venv/bin/python -m bench.lock_recovery [--expire 3 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from orchestrator.locks import LockManager, vm_lock

from .harness import environment, percentile

HOLDER = """
import sys, time
from orchestrator.locks import LockManager, vm_lock
m = LockManager(sys.argv[1], owner="bench-holder", expire=int(sys.argv[2]))
with m.hold(vm_lock("bench", "victim"), timeout=30):
    print("held", flush=True)
    time.sleep(3600)
"""


def once(url: str, expire: int) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expire", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    table = Table(title="B4 recovery: a waiter takes the lock of a SIGKILLed holder")
    for col in ("expiry E (s)", "p50 wait (s)", "max wait (s)", "max - E (s)", "target"):
        table.add_column(col, justify="right")
    with environment() as env:
        url = env.settings.resolved_redis_url()
        for expire in args.expire:
            waits = [once(url, expire) for _ in range(args.rounds)]
            table.add_row(str(expire), f"{percentile(waits, 50):.2f}", f"{max(waits):.2f}",
                          f"{max(waits) - expire:+.2f}", "max <= E + 1")
    Console().print(table)


if __name__ == "__main__":
    main()
