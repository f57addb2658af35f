"""CLI start-up: a simple command end to end, next to the interpreter starting and doing nothing."""

from __future__ import annotations

import subprocess
import sys
import time

from .harness import ROOT, Env, percentile
from .suite import Row, Sizes

RUNS = 10


def _time(env: Env, argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env.env(), check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return percentile(times[1:], 50)  # the first run fills the page cache


def run(env: Env, sizes: Sizes) -> list[Row]:
    runs = max(3, min(RUNS, sizes.b1_n // 4))
    bare = _time(env, [sys.executable, "-c", "pass"], runs)
    rows = []
    for args in (["--help"], ["job", "list"]):
        s = _time(env, [sys.executable, "-m", "cli", *args], runs)
        rows.append(Row("CLI", f"vmorch {' '.join(args)} start-up, median of {runs}", f"{s * 1e3:.0f} ms",
                        f"{bare * 1e3:.0f} ms python -c pass", s / bare, "", None))
    return rows
