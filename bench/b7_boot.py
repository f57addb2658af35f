"""B7: one test guest from launch to its agent answering, through vmorch on an embedded-QEMU host,
next to the same domain XML booted on a direct libvirt connection and polled with ``guest-ping``.

Each round boots the two at the same moment (the direct request sent, then vmorch's launch; the
other way round every second round), so both boots see the same load on the machine: on two cores
shared with other work, boots of one guest alone took from 8 to 29 s within minutes. Each side times
itself (vmorch: submit → ``exec true`` succeeded, in this process; direct: first disk made → agent
answered, in its process). A warm-up round first (the first QEMU start of a process reads the
binary, the firmware and the image from disk); each round's guests are deleted before the next."""

from __future__ import annotations

from statistics import median

from .guests import MEMORY_MIB, Direct, Guests, no_leftovers, start_hosts
from .harness import Env
from .suite import Row, Sizes, at_most

TARGET = 1.1
#: seconds a boot may take before the round fails (TCG on two busy cores: about 8–30 s)
BOOT_TIMEOUT = 300.0


def run(env: Env, sizes: Sizes) -> list[Row]:
    guests: list[Guests] = []
    directs: list[Direct] = []
    with no_leftovers(env, guests, directs):
        g = start_hosts(env, ["h1"])
        guests.append(g)
        direct = Direct(env, "direct", g.virt_type)
        directs.append(direct)

        def both(i: int) -> tuple[float, float]:
            """(vmorch, direct) seconds of round ``i``, booted at once."""
            mine, theirs = f"g{i}", f"d{i}"

            def start_direct() -> None:
                direct.send(op="boot", names=[theirs], memory_mib=MEMORY_MIB, timeout=BOOT_TIMEOUT)

            if i % 2:
                took = g.to_agent([mine], BOOT_TIMEOUT, then=start_direct)
            else:
                start_direct()
                took = g.to_agent([mine], BOOT_TIMEOUT)
            base = float(direct.receive()["took"])
            g.delete([mine])
            direct.delete([theirs])
            return took, base

        both(0)
        rounds = [both(i + 1) for i in range(sizes.b7_rounds)]
    ours, base = [r[0] for r in rounds], [r[1] for r in rounds]
    o, b = median(ours), median(base)
    return [Row("B7", f"boot to agent-ready, 1 guest ({g.accel.upper()}), vmorch launch + exec true; median of "
                      f"{len(ours)} rounds, both booted at once (ours {', '.join(f'{x:.1f}' for x in ours)} s, "
                      f"direct {', '.join(f'{x:.1f}' for x in base)} s)",
                f"{o:.2f} s", f"{b:.2f} s direct define+start, guest-ping", *at_most(o / b, TARGET)),
            Row("B7", f"accelerator (the worker's probe): {g.accel.upper()}: {g.accel_reason}", "", "", None, "", None)]
