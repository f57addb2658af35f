"""The benchmark code still runs (tiny sizes; the figures themselves are not judged here)."""

from __future__ import annotations

import shutil

import pytest

from bench.__main__ import run
from bench.suite import TINY, markdown


def test_benchmarks_run_with_tiny_sizes() -> None:
    rows = run(["B1", "B3", "B4"], TINY)
    assert {r.id for r in rows} == {"B1", "B3", "B4"}
    assert not [r for r in rows if r.what.startswith("did not complete")], markdown(rows)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_guest_exec_benchmark_runs_with_tiny_sizes() -> None:
    """B8 boots two test guests (one through vmorch, one on a direct connection): about 35 s under TCG."""
    rows = run(["B8"], TINY)
    assert [r.id for r in rows] == ["B8"]
    assert not [r for r in rows if r.what.startswith("did not complete")], markdown(rows)
