"""``--wait``: follow jobs to their final state with a progress display on stderr."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import typer

from orchestrator.model.records import Job

from . import render

if TYPE_CHECKING:
    from orchestrator.services.client import Client

    from .context import State


def wait(client: Client, jobs: Sequence[Job], *, timeout: float | None = None, parent: Job | None = None) -> list[Job]:
    """Follow ``jobs`` (a bulk command's children, with their ``parent``) to their final states."""
    # imported here: only '--wait' needs it (start-up time of every other command)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    ids = [j.id for j in jobs]
    prefix = f"job {parent.id} ({len(ids)} jobs): " if parent is not None else ""
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    # Only on a terminal: piped, a progress display is noise (and leaves a blank line behind).
    with Progress(*columns, console=render.err, transient=True, disable=not render.err.is_terminal) as progress:
        task = progress.add_task(prefix + _describe(jobs), total=len(ids))

        def update(current: list[Job]) -> None:
            progress.update(task, completed=sum(j.state.final for j in current),
                            description=prefix + _describe(current))

        return client.wait(ids, timeout=timeout, on_update=update)


def _describe(jobs: Sequence[Job]) -> str:
    if len(jobs) == 1:
        j = jobs[0]
        return f"job {j.id} {j.op.value} {j.vm}: {j.state.value}"
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.state.value] = counts.get(j.state.value, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def report_jobs(st: State, jobs: Sequence[Job], wait_: bool) -> None:
    """What a mutating command prints: its parent job (if any) and its jobs, after waiting for them
    with ``--wait``; exits 1 if one failed."""
    done = list(jobs)
    parent = st.client.job(done[0].parent) if done and done[0].parent is not None else None
    if wait_:
        done = wait(st.client, done, parent=parent)
        parent = st.client.job(parent.id) if parent is not None else None
    if st.json:
        render.dump_json(done[0] if len(done) == 1 else done)
    else:
        for job in ([parent] if parent is not None else []) + done:
            render.out.print(render.job_line(job))
    if wait_ and render.any_failed(done):
        raise typer.Exit(1)
