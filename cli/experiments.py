"""``vmorch experiment ...``: check, run and follow experiment files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.model.errors import InvalidInput
from orchestrator.model.records import JobState

from . import render
from .context import state
from .waiting import wait as wait_for

if TYPE_CHECKING:
    from orchestrator.store.runs import ExperimentRun

app = typer.Typer(help="Experiments: VMs, ordered steps and a teardown, from a YAML file, run as one job graph.",
                  no_args_is_help=True)

File = Annotated[Path, typer.Argument(metavar="FILE", help="the experiment file (YAML)")]


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidInput(f"can't read {path}: {exc.strerror}", hint="give the path of an experiment file") from None


@app.command()
def validate(ctx: typer.Context, path: File) -> None:
    """Check a file and report every problem with its line; exit 2 if there is one."""
    from orchestrator.model import experiment  # imported here: YAML is for this command only (start-up time)

    st = state(ctx)
    exp, problems = experiment.parse(read(path))
    if st.json:
        render.dump_json({"valid": exp is not None, "problems": [p.model_dump() for p in problems]})
    elif exp is not None:
        vms = len(exp.vm_names())
        render.out.print(f"{path}: ok ({vms} VMs, {len(exp.steps)} steps, {len(exp.teardown_steps())} teardown steps)")
    else:
        for p in problems:
            render.err.print(f"{path}:{p.line or '?'}: {p.field + ': ' if p.field else ''}{p.message}", markup=False)
    if exp is None:
        raise typer.Exit(2)


@app.command()
def run(ctx: typer.Context, path: File,
        wait: Annotated[bool, typer.Option("--wait", "-w", help="wait until every step is final; exit 1 if "
                                                                 "one failed")] = False) -> None:
    """Run an experiment: launch its VMs, run its steps in order, then its teardown (even after a failure)."""
    st = state(ctx)
    result = st.client.run_experiment(read(path), namespace=st.namespace, source=str(path))
    if wait:
        wait_for(st.client, list(result.jobs.values()))
        result = st.client.experiment_run(result.id)
    show_run(result, as_json=st.json)
    if wait and result.state is not JobState.SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def status(ctx: typer.Context, run_id: Annotated[int, typer.Argument(metavar="RUN")]) -> None:
    """Show a run's graph: each step's parent job, its progress and what it waits for."""
    st = state(ctx)
    show_run(st.client.experiment_run(run_id), as_json=st.json)


@app.command(name="list")
def list_(ctx: typer.Context, limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20) -> None:
    """List the namespace's experiment runs, newest first."""
    st = state(ctx)
    runs = st.client.experiment_runs(st.namespace, limit=limit)
    if st.json:
        render.dump_json(runs)
        return
    if not runs:
        render.err.print(f"no experiment runs in namespace {st.namespace!r}; start one with 'vmorch experiment run "
                         "FILE'")
        return
    table = render.new_table()
    for col in ("RUN", "NAME", "STATE", "STEPS", "STARTED", "SOURCE", "BY"):
        table.add_column(col, no_wrap=True)
    for r in runs:
        done = sum(j.state.final for j in r.jobs.values())
        table.add_row(str(r.id), r.name, render.styled(r.state.value), f"{done}/{len(r.steps)}",
                      render.when(r.started_at), r.source, r.by)
    render.out.print(table)


def show_run(result: ExperimentRun, *, as_json: bool) -> None:
    if as_json:
        render.dump_json(result)
        return
    render.out.print(f"run {result.id} {result.name} ({result.namespace}): {render.styled(result.state.value)}")
    table = render.new_table()
    for col in ("STEP", "KIND", "JOB", "STATE", "DONE", "FAILED", "AFTER", "ERROR"):
        table.add_column(col, no_wrap=col != "ERROR")
    for step in result.steps:
        job = result.jobs.get(step.name)
        if job is None or job.children is None:
            continue
        c = job.children
        after = ", ".join(step.after) + (" (final)" if step.kind == "teardown" and step.after else "")
        table.add_row(step.name, step.kind, str(job.id), render.styled(job.state.value),
                      f"{c['total'] - c['pending']}/{c['total']}", str(c["failed"]), after,
                      job.error.message if job.error else "")
    render.out.print(table)
