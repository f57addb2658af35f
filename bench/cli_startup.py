"""CLI start-up: simple commands end to end, next to the interpreter starting and doing nothing.

The commands and the bare interpreter run interleaved, round after round (a busy machine slows all of
them alike), against the bench's Redis: ``job list`` on an empty namespace and ``vm show`` of a VM
that isn't there (it still connects, reads and prints its error). Target (issue 16): <= 8x.

A last row times the libraries those commands can't do without, imported and nothing else: redis-py
(8.x imports its asyncio client, cluster and OpenTelemetry modules), pydantic with one model built,
typer and rich's console. It is the floor the target is measured against.
"""

from __future__ import annotations

import subprocess
import sys
import time

from .harness import ROOT, Env, percentile
from .suite import Row, Sizes

RUNS = 10
TARGET = 8.0
COMMANDS = (["--help"], ["job", "list"], ["vm", "show", "nosuchvm"])
FLOOR = ("import redis, typer, rich.console, pydantic\n"
         "class M(pydantic.BaseModel):\n    x: int\nM(x=1)")


def _once(env: Env, argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env.env(), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def run(env: Env, sizes: Sizes) -> list[Row]:
    runs = max(3, min(RUNS, sizes.b1_n // 4))
    argvs = [[sys.executable, "-c", "pass"]] + [[sys.executable, "-m", "cli", *args] for args in COMMANDS]
    argvs.append([sys.executable, "-c", FLOOR])
    times: list[list[float]] = [[] for _ in argvs]
    for round_ in range(runs + 1):
        for i, argv in enumerate(argvs):
            took = _once(env, argv)
            if round_:  # the first round fills the page cache
                times[i].append(took)
    bare = percentile(times[0], 50)
    rows = []
    for args, samples in zip(COMMANDS, times[1:-1], strict=True):
        s = percentile(samples, 50)
        target = "" if args == ["--help"] else f"<= {TARGET:g}x"
        rows.append(Row("CLI", f"vmorch {' '.join(args)} start-up, median of {runs}, interleaved", f"{s * 1e3:.0f} ms",
                        f"{bare * 1e3:.0f} ms python -c pass", s / bare, target,
                        None if not target else s / bare <= TARGET))
    floor = percentile(times[-1], 50)
    rows.append(Row("CLI", "  the floor: redis, pydantic (one model), typer, rich imported, nothing run",
                    f"{floor * 1e3:.0f} ms", f"{bare * 1e3:.0f} ms python -c pass", floor / bare, "", None))
    return rows
