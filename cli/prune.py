"""``vmorch job prune``: remove old finished jobs and their history now (the janitors do it continuously)."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from orchestrator.model.errors import InvalidInput

from . import render
from .context import state

#: seconds per unit of a duration such as ``1d12h``
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
#: longer than any retention anyone means: a mistyped number, not an age
MAX_AGE = 100 * 365 * 86400


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds (``3600``), or parts such as ``90s``, ``30m``, ``12h``,
    ``7d``, ``2w``, ``1d12h``. Raises InvalidInput (exit 2) on anything else."""
    cleaned = text.strip().lower()
    seconds: float | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        seconds = float(cleaned)
    elif cleaned and re.fullmatch(f"(?:{_PART.pattern})+", cleaned):
        seconds = sum(float(n) * UNITS[unit] for n, unit in _PART.findall(cleaned))
    if seconds is None or seconds > MAX_AGE:
        raise InvalidInput(f"--older-than: {text!r} is not a duration",
                           hint="give seconds, or a duration such as 90s, 30m, 12h, 7d, 2w or 1d12h")
    return seconds


def prune(
    ctx: typer.Context,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", metavar="DURATION",
        help="finished longer ago than this (7d, 12h, 30m, 90s or seconds); default: VMORCH_JOB_RETENTION")] = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A",
                                                 help="every namespace, not only --namespace")] = False,
) -> None:
    """Remove finished jobs older than the retention, with their history, now (archived first if
    VMORCH_JOB_ARCHIVE_DIR is set). Never a job an unfinished job needs, nor a parent before its children."""
    age = parse_duration(older_than) if older_than is not None else None
    st = state(ctx)
    report = st.client.prune(None if all_namespaces else st.namespace, older_than=age)
    if st.json:
        render.dump_json(report)
        return
    if report.cutoff is None:
        render.out.print("retention is off (VMORCH_JOB_RETENTION=0): nothing removed; give --older-than")
        return
    jobs = "job" if report.removed == 1 else "jobs"
    line = f"removed {report.removed} {jobs} finished before {render.iso(report.cutoff)}"
    if report.archive_dir is not None:
        line += f"; archived {report.archived} to {render.escape(report.archive_dir)}"
    if report.kept:
        line += f"; kept {report.kept} that unfinished jobs still need"
    render.out.print(line)
