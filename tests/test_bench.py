"""The benchmark code still runs (tiny sizes; the figures themselves are not judged here)."""

from __future__ import annotations

from bench.__main__ import run
from bench.suite import TINY, markdown


def test_benchmarks_run_with_tiny_sizes() -> None:
    rows = run(["B1", "B3", "B4"], TINY)
    assert {r.id for r in rows} == {"B1", "B3", "B4"}
    assert not [r for r in rows if r.what.startswith("did not complete")], markdown(rows)
