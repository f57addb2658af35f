"""B9: many test guests (``MEMORY_MIB`` each) launched to agent-ready through vmorch on 2 embedded-QEMU
hosts, next to the same guests started at once by direct libvirt scripts, one per host's worth of
guests (two ``bench.direct_guests`` processes, one embedded root each, as the two workers have).

vmorch: every launch submitted pinned round-robin to the two hosts, then every ``exec true`` (each
waits for its guest's agent), until the last exec succeeded. Direct: each process makes, defines and
starts its guests in a loop, then polls ``guest-ping`` on all of them until the last answers; the
time is until both processes are done. Rounds alternate which side goes first; all guests of a
round are deleted before the next. Under TCG on two cores this is the CPU's work more than anyone's:
the target is about what vmorch adds to it."""

from __future__ import annotations

import time
from statistics import median

from .guests import MEMORY_MIB, Direct, Guests, no_leftovers, start_hosts
from .harness import Env
from .suite import Row, Sizes, at_most

TARGET = 1.15
HOSTS = ("h1", "h2")


def boot_timeout(guests: int) -> float:
    """Seconds a round may take: about 30 s of TCG a guest on one core, with room."""
    return 120.0 + 30.0 * guests


def run(env: Env, sizes: Sizes) -> list[Row]:
    guests: list[Guests] = []
    directs: list[Direct] = []
    n = sizes.b9_guests
    timeout = boot_timeout(n)
    with no_leftovers(env, guests, directs):
        g = start_hosts(env, HOSTS)
        guests.append(g)
        directs += [Direct(env, f"direct{i + 1}", g.virt_type) for i in range(len(HOSTS))]

        def direct_round(names: list[str]) -> float:
            t = time.perf_counter()
            for i, d in enumerate(directs):
                d.send(op="boot", names=names[i::len(directs)], memory_mib=MEMORY_MIB, timeout=timeout)
            for d in directs:
                d.receive()
            took = time.perf_counter() - t
            for i, d in enumerate(directs):
                d.delete(names[i::len(directs)])
            return took

        def vmorch_round(names: list[str]) -> float:
            took = g.to_agent(names, timeout)
            g.delete(names)
            return took

        # warm-up: each process's first QEMU start reads the binary, the firmware and the image
        direct_round([f"warm{i}" for i in range(len(HOSTS))])
        vmorch_round([f"warm{i}" for i in range(len(HOSTS))])
        ours: list[float] = []
        base: list[float] = []
        for r in range(sizes.b9_rounds):
            direct_names, vmorch_names = [f"d{r}x{i}" for i in range(n)], [f"g{r}x{i}" for i in range(n)]
            if r % 2 == 0:
                base.append(direct_round(direct_names))
                ours.append(vmorch_round(vmorch_names))
            else:
                ours.append(vmorch_round(vmorch_names))
                base.append(direct_round(direct_names))
    o, b = median(ours), median(base)
    rounds = (f"median of {len(ours)} rounds (ours {', '.join(f'{x:.1f}' for x in ours)} s, direct "
              f"{', '.join(f'{x:.1f}' for x in base)} s)" if len(ours) > 1 else "1 round")
    return [Row("B9", f"{n} guests ({MEMORY_MIB} MiB, {g.accel.upper()}) to agent-ready on {len(HOSTS)} hosts, "
                      f"vmorch launch + exec true; {rounds}", f"{o:.1f} s",
                f"{b:.1f} s direct define+start, guest-ping ({len(directs)} processes)", *at_most(o / b, TARGET))]
