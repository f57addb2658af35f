"""What every benchmark returns (rows of one table), the sizes of a full and a quick run, and the table."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Sizes:
    b1_n: int = 200
    b2_vms: int = 200
    b2_ops: int = 2000
    b3_ops: int = 200
    b3_submitters: int = 4
    b4_cycles: int = 2000
    b4_handoffs: int = 50
    b4_expire: int = 3
    b4_recoveries: int = 3
    b5_hosts: int = 20
    b5_vms: int = 10_000
    b5_launch_hosts: int = 4
    b5_launches: int = 1000
    b6_vms: int = 10
    b6_hosts: int = 2
    b7_rounds: int = 7
    b8_n: int = 400
    b9_guests: int = 20
    b9_rounds: int = 1
    m1_jobs: int = 100_000
    m1_vms: int = 1000


FULL = Sizes()
QUICK = Sizes(b1_n=40, b2_vms=40, b2_ops=200, b3_ops=40, b4_cycles=300, b4_handoffs=15, b4_expire=2,
              b4_recoveries=1, b5_vms=1000, b5_launches=100, b6_vms=4, b7_rounds=3, b8_n=100,
              b9_guests=4, b9_rounds=2, m1_jobs=10_000, m1_vms=200)
#: for the test that checks the benchmark code still runs
TINY = Sizes(b1_n=3, b2_vms=4, b2_ops=8, b3_ops=8, b4_cycles=5, b4_handoffs=2, b4_expire=2, b4_recoveries=1,
             b5_hosts=2, b5_vms=10, b5_launch_hosts=2, b5_launches=4, b6_vms=2, b7_rounds=1,
             b8_n=3, b9_guests=2, b9_rounds=1, m1_jobs=40, m1_vms=4)


@dataclass(frozen=True)
class Row:
    id: str
    what: str
    ours: str
    baseline: str
    #: ours / baseline in the unit of the target (None: absolute target)
    ratio: float | None
    target: str
    passed: bool | None


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def at_most(ratio: float, limit: float) -> tuple[float, str, bool]:
    return ratio, f"≤ {limit:g}×", ratio <= limit


def at_least(ratio: float, limit: float) -> tuple[float, str, bool]:
    return ratio, f"≥ {limit:g}×", ratio >= limit


def render(rows: list[Row], title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "what", "ours", "baseline (same run)", "ratio", "target", "pass"):
        table.add_column(col, justify="left" if col in ("id", "what", "target") else "right")
    for r in rows:
        verdict = "" if r.passed is None else ("PASS" if r.passed else "FAIL")
        table.add_row(r.id, r.what, r.ours, r.baseline, "" if r.ratio is None else f"{r.ratio:.2f}", r.target,
                      verdict)
    return table


def markdown(rows: list[Row]) -> str:
    out = ["| id | what | ours | baseline (same run) | ratio | target | pass |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "" if r.passed is None else ("pass" if r.passed else "FAIL")
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        out.append(f"| {r.id} | {r.what} | {r.ours} | {r.baseline} | {ratio} | {r.target} | {verdict} |")
    return "\n".join(out)


def show(rows: list[Row], title: str) -> None:
    Console(width=200).print(render(rows, title))
