"""``vmorch job ...``: follow and steer jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.model.operation import Op
from orchestrator.model.records import JobState

from . import completion, render
from .context import state
from .prune import prune
from .waiting import wait as wait_for

JobId = Annotated[int, typer.Argument(metavar="ID", autocompletion=completion.job_ids)]

app = typer.Typer(help="Show, list, wait for and cancel jobs.", no_args_is_help=True)


@app.command()
def show(ctx: typer.Context, job_id: JobId) -> None:
    """Show one job."""
    st = state(ctx)
    job = st.client.job(job_id)
    found = st.client.history(job.namespace, vm=job.vm or None, job_id=job.id)  # a parent job has no VM
    events = found.events
    children = st.client.children(job.id) if job.is_parent else []
    failed = [c for c in children if c.state is JobState.FAILED]
    if st.json:
        extra = {"by_state": render.by_state(children), "failed": [c.model_dump(mode="json") for c in failed]} \
            if job.is_parent else {}
        render.dump_json({**job.model_dump(mode="json"), **extra,
                          "events": [e.model_dump(mode="json") for e in events], "history_trimmed": found.trimmed})
        return
    render.out.print(render.job_detail(job))
    if job.is_parent:
        counts = render.by_state(children)
        render.out.print("children: " + ", ".join(f"{n} {render.styled(s)}" for s, n in counts.items()))
        if failed:
            render.out.print(render.jobs_table(failed))
    if events:
        render.out.print(render.events_table(events))
    if found.trimmed:
        render.out.print(f"(older history trimmed: {found.trimmed} earlier entries are no longer kept)")


@app.command(name="list")
def list_(
    ctx: typer.Context,
    vm: Annotated[str | None, typer.Option("--vm", help="only this VM's jobs")] = None,
    job_state: Annotated[JobState | None, typer.Option("--state", help="only jobs in this state")] = None,
    op: Annotated[Op | None, typer.Option("--op", help="only this operation")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 50,
) -> None:
    """List the namespace's jobs, newest first."""
    st = state(ctx)
    render.listing(st.client.jobs(st.namespace, vm=vm, state=job_state, op=op, limit=limit), render.jobs_table,
                   as_json=st.json, empty="no jobs match")


@app.command()
def wait(
    ctx: typer.Context,
    job_ids: Annotated[list[int], typer.Argument(metavar="ID...", autocompletion=completion.job_ids)],
    timeout: Annotated[float | None, typer.Option("--timeout", help="give up after this many seconds")] = None,
) -> None:
    """Wait until jobs are final; exit 1 if one failed or was canceled."""
    st = state(ctx)
    jobs = wait_for(st.client, [st.client.job(i) for i in job_ids], timeout=timeout)
    if st.json:
        render.dump_json(jobs)
    else:
        for job in jobs:
            render.out.print(render.job_line(job))
    if render.any_failed(jobs) or not all(j.state.final for j in jobs):
        raise typer.Exit(1)


@app.command()
def retry(ctx: typer.Context, job_id: JobId,
          wait: Annotated[bool, typer.Option("--wait", "-w", help="wait until the new jobs are final")] = False,
          ) -> None:
    """Run a failed job again (a new job, linked by retry_of); for a parent job, only its failed
    children, under a new parent."""
    st = state(ctx)
    jobs = st.client.retry(job_id)
    parent = st.client.job(jobs[0].parent) if jobs[0].parent is not None else None
    if wait:
        jobs = wait_for(st.client, jobs, parent=parent)
        parent = st.client.job(parent.id) if parent is not None else None
    if st.json:
        render.dump_json(jobs[0] if parent is None else [parent, *jobs])
    else:
        for job in ([parent] if parent else []) + jobs:
            render.out.print(render.job_line(job))
    if wait and render.any_failed(jobs):
        raise typer.Exit(1)


@app.command()
def cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Cancel a job: at once if not started, at its next step if running. For a parent job: its
    children not yet started (running ones finish)."""
    st = state(ctx)
    job = st.client.cancel(job_id)
    if st.json:
        render.dump_json(job)
    elif job.is_parent:
        render.out.print(render.job_line(job))
    elif job.state is JobState.RUNNING:
        render.out.print(f"job {job.id} is running; it stops at its next step ({render.job_line(job)})")
    else:
        render.out.print(render.job_line(job))


app.command(name="prune")(prune)  # defined apart: it is the janitors' work, run now
