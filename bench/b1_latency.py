"""B1: submit -> succeeded of a cheap operation (pause/resume on test:///default), p50 and p99,
next to a bare Celery task round trip with the same broker, app settings, pool and worker flags."""

from __future__ import annotations

from .common import bare_round_trip, pause_resume
from .harness import Env, percentile
from .suite import Row, Sizes, at_most, ms

TARGET = 1.5


def run(env: Env, sizes: Sizes) -> list[Row]:
    bare, vmorch_once = pause_resume(env, "b1", "B1")
    for _ in range(10):  # warm-up both paths
        bare_round_trip(bare, "bare.b1")
        vmorch_once()
    bare_times, ours = [], []
    for _ in range(sizes.b1_n):  # interleaved, so machine noise hits both alike
        bare_times.append(bare_round_trip(bare, "bare.b1"))
        ours.append(vmorch_once())
    rows = []
    for p in (50, 99):
        b, o = percentile(bare_times, p), percentile(ours, p)
        rows.append(Row("B1", f"pause/resume submit→succeeded p{p} (n={sizes.b1_n})", ms(o),
                        f"{ms(b)} bare Celery round trip", *at_most(o / b, TARGET)))
    return rows
