"""``vmorch job ...``: follow and steer jobs."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.operation import Op
from orchestrator.records import JobState

from . import completion, render
from .context import state
from .waiting import wait as wait_for

JobId = Annotated[int, typer.Argument(metavar="ID", autocompletion=completion.job_ids)]

app = typer.Typer(help="Show, list, wait for and cancel jobs.", no_args_is_help=True)


@app.command()
def show(ctx: typer.Context, job_id: JobId) -> None:
    """Show one job."""
    st = state(ctx)
    job = st.client.job(job_id)
    events = st.client.events(job.namespace, vm=job.vm, job_id=job.id)
    if st.json:
        render.dump_json({**job.model_dump(mode="json"), "events": [e.model_dump(mode="json") for e in events]})
    else:
        render.out.print(render.job_detail(job))
        if events:
            render.out.print(render.events_table(events))


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
def cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Cancel a job: at once if not started, at its next step if running."""
    st = state(ctx)
    job = st.client.cancel(job_id)
    if st.json:
        render.dump_json(job)
    elif job.state is JobState.RUNNING:
        render.out.print(f"job {job.id} is running; it stops at its next step ({render.job_line(job)})")
    else:
        render.out.print(render.job_line(job))
