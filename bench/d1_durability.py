"""D1: what durable acceptance costs. ``appendfsync always`` (Redis fsyncs its AOF before it
answers; 'vmorch up' and compose run it so) against ``everysec`` (up to 1 s of accepted jobs
lost in a power loss), in the same run, each part on one Redis switched with CONFIG SET:

* B1's submit→succeeded of pause/resume, p50 and p99, the two settings interleaved sample by
  sample, each next to B1's bare Celery round trip under the same setting;
* B5's launch rate (one batch on 4 test-driver hosts), rounds in the order everysec, always,
  always, everysec, so that a drift of the machine's load hits both alike.

The ratio is always / everysec: above 1 for a latency, below 1 for a rate, means always costs.
"""

from __future__ import annotations

import time

from .common import bare_round_trip, launch_hosts, pause_resume, require_succeeded, spread_launches
from .harness import Env, environment, percentile, set_appendfsync
from .suite import Row, Sizes, ms

MODES = ("everysec", "always")


def _latency(env: Env, sizes: Sizes) -> list[Row]:
    bare, vmorch_once = pause_resume(env, "d1", "D1")
    for mode in MODES:  # warm-up both paths under both settings
        set_appendfsync(env.url, mode)
        for _ in range(5):
            bare_round_trip(bare, "bare.d1")
            vmorch_once()
    bare_times: dict[str, list[float]] = {m: [] for m in MODES}
    ours: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(sizes.b1_n):  # interleaved, each setting first in turn
        for mode in (MODES if i % 2 else MODES[::-1]):
            set_appendfsync(env.url, mode)
            bare_times[mode].append(bare_round_trip(bare, "bare.d1"))
            ours[mode].append(vmorch_once())
    rows = []
    for p in (50, 99):
        o = {m: percentile(ours[m], p) for m in MODES}
        b = {m: percentile(bare_times[m], p) for m in MODES}
        rows.append(Row("D1", f"B1 pause/resume submit→succeeded p{p} (n={sizes.b1_n}), always / everysec",
                        ms(o["always"]),
                        f"{ms(o['everysec'])} everysec; bare Celery {ms(b['always'])} always, "
                        f"{ms(b['everysec'])} everysec ({b['always'] / b['everysec']:.2f}×)",
                        o["always"] / o["everysec"], "— (the cost)", None))
    return rows


def _launches(env: Env, sizes: Sizes) -> list[Row]:
    hosts, client = launch_hosts(env, sizes.b5_launch_hosts)  # as B5
    took = {m: 0.0 for m in MODES}
    accepted = {m: 0.0 for m in MODES}
    for r, mode in enumerate(("everysec", "always", "always", "everysec")):
        set_appendfsync(env.url, mode)
        ops = spread_launches(f"d1r{r}", sizes.b5_launches)
        t = time.perf_counter()
        jobs = client.submit(ops)
        accepted[mode] += time.perf_counter() - t
        require_succeeded(client.wait([j.id for j in jobs], timeout=900))
        took[mode] += time.perf_counter() - t
    rate = {m: 2 * sizes.b5_launches / took[m] for m in MODES}
    each = {m: f"{accepted[m] / 2:.2f} s {m}" for m in MODES}
    return [Row("D1", f"B5 launch {sizes.b5_launches} VMs on {len(hosts)} hosts, one batch, 2 rounds each "
                      f"(accepted in {each['always']}, {each['everysec']}), always / everysec",
                f"{rate['always']:.0f} VMs/s", f"{rate['everysec']:.0f} VMs/s everysec",
                rate["always"] / rate["everysec"], "— (the cost)", None)]


def run(env: Env, sizes: Sizes) -> list[Row]:
    rows = _latency(env, sizes)
    with environment() as fresh:  # B5's launches on 4 hosts of their own, as B5 runs them
        rows += _launches(fresh, sizes)
    return rows
