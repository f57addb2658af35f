"""B8: ``vm exec g1 -- true`` round trip (client submit → job succeeded, with its exit code) next to a
direct ``guest-exec`` + ``guest-exec-status`` polling on a libvirt connection, and a bare Celery round
trip to a bare worker beside vmorch's.

Both guests are booted to agent-ready first and run side by side during the measurement (one
through vmorch, one on the direct connection: one embedded root per process). The three round trips
are interleaved sample by sample. Target: vmorch ≤ 1.5 × direct + one bare Celery round trip,
shown as (vmorch − bare) / direct ≤ 1.5×.

The figures are means, not medians: both sides poll ``guest-exec-status`` at once and then every
50 ms (vmorch's ``worker.execs`` schedule), and whether ``true`` has already exited at the first poll
is a coin toss for either, so each side's samples fall in two clusters about 50 ms apart (about
20 ms and 70 ms under TCG) and a median jumps between them from run to run."""

from __future__ import annotations

import time
from statistics import mean, median

from .common import bare_app, bare_round_trip
from .guests import MEMORY_MIB, Direct, Guests, check_exit_zero, no_leftovers, start_hosts
from .harness import Env
from .suite import Row, Sizes, at_most, ms

TARGET = 1.5
BOOT_TIMEOUT = 300.0
#: untimed round trips of each kind first (Python's and Celery's first calls, the guest's caches)
WARMUP = 3


def run(env: Env, sizes: Sizes) -> list[Row]:
    guests: list[Guests] = []
    directs: list[Direct] = []
    with no_leftovers(env, guests, directs):
        env.bare_worker("bare.h1")
        g = start_hosts(env, ["h1"])
        guests.append(g)
        direct = Direct(env, "direct", g.virt_type)
        directs.append(direct)
        bare = bare_app(env.url, ["bare.h1"])
        direct.send(op="boot", names=["d1"], memory_mib=MEMORY_MIB, timeout=BOOT_TIMEOUT)  # both boot at once
        g.to_agent(["g1"], BOOT_TIMEOUT)
        direct.receive()

        def vmorch_once() -> float:
            t = time.perf_counter()
            done = g.exec_true(["g1"], timeout=60)
            took = time.perf_counter() - t
            check_exit_zero(done)
            return took

        ours: list[float] = []
        base: list[float] = []
        celery: list[float] = []
        for i in range(WARMUP + sizes.b8_n):
            samples = (vmorch_once(), direct.exec_true("d1"), bare_round_trip(bare, "bare.h1"))
            if i >= WARMUP:
                for into, value in zip((ours, base, celery), samples, strict=True):
                    into.append(value)
    o, b, c = mean(ours), mean(base), mean(celery)
    return [Row("B8", f"vm exec g1 -- true, submit→succeeded, mean of {len(ours)} ({g.accel.upper()}; p50s: "
                      f"{ms(median(ours))}, direct {ms(median(base))}); ratio (ours − bare) / direct", ms(o),
                f"{ms(b)} direct guest-exec+status; {ms(c)} bare Celery round trip",
                *at_most((o - c) / b, TARGET))]
