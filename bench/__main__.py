"""Run the benchmark suite: ``python -m bench [B1 B3 ...] [--quick]``.

Every benchmark starts its own Redis and workers and measures its baseline in the same run;
one table of all results is printed at the end.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from . import harness
from .harness import environment
from .suite import FULL, QUICK, Row, Sizes, markdown, show

BENCHMARKS = {
    "B1": "bench.b1_latency",
    "B2": "bench.b2_throughput",
    "B3": "bench.b3_one_vm",
    "B4": "bench.b4_locks",
    "B5": "bench.b5_scale",
    "B6": "bench.b6_qemu",
    "B7": "bench.b7_boot",
    "B8": "bench.b8_exec",
    "B9": "bench.b9_guests",
    "CLI": "bench.cli_startup",
    "D1": "bench.d1_durability",
    "M1": "bench.m1_memory",
}


def run(ids: list[str], sizes: Sizes, *, on_done: object = None) -> list[Row]:
    rows: list[Row] = []
    for bid in ids:
        module = importlib.import_module(BENCHMARKS[bid])
        t = time.monotonic()
        print(f"{bid} ...", file=sys.stderr, flush=True)
        with environment() as env:
            try:
                got: list[Row] = module.run(env, sizes)
            except Exception as exc:
                traceback.print_exc()
                env.keep = True
                got = [Row(bid, f"did not complete: {type(exc).__name__}: {exc}", "", "", None, "", False)]
        print(f"{bid} done in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        rows += got
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("ids", nargs="*", metavar="ID",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute or two)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--appendfsync", choices=("always", "everysec", "no"), default=harness.APPENDFSYNC,
                        help="when the benchmarks' Redis fsyncs its AOF (default: %(default)s; 'vmorch up' "
                             "runs always; D1 compares the two whatever this says)")
    args = parser.parse_args(argv)
    ids = [i.upper() for i in args.ids] or list(BENCHMARKS)
    unknown = [i for i in ids if i not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]} (known: {', '.join(BENCHMARKS)})")
    sizes = QUICK if args.quick else FULL
    harness.APPENDFSYNC = args.appendfsync
    started = time.monotonic()
    rows = run(ids, sizes)
    show(rows, f"vmorch benchmarks ({'quick' if args.quick else 'full'} sizes, appendfsync {args.appendfsync}, "
               f"{time.monotonic() - started:.0f} s)")
    if args.markdown:
        print(markdown(rows))
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
