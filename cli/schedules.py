"""``vmorch schedule ...`` (recurring or one-off runs) and ``vmorch scheduler`` (the process that fires them)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from typer.main import get_command

from orchestrator.model.errors import InvalidInput

from . import render, vms
from .context import LogFormat, state
from .experiments import read

if TYPE_CHECKING:
    from rich.table import Table

    from orchestrator.services.schedules import Schedule

app = typer.Typer(help="Run an experiment or a vm command by cron, every N, or once at a time.",
                  no_args_is_help=True)

Name = Annotated[str, typer.Argument(metavar="NAME", help="the schedule's name (per namespace)")]


@app.command()
def add(
    ctx: typer.Context, name: Name,
    command: Annotated[list[str] | None, typer.Argument(metavar="-- vm COMMAND...",
                                                        help="the vm command to run, after --")] = None,
    cron: Annotated[str | None, typer.Option("--cron", help='cron expression in UTC: "0 2 * * *"')] = None,
    every: Annotated[str | None, typer.Option("--every", help="an interval: 30s, 10m, 1h, 1d")] = None,
    at: Annotated[datetime | None, typer.Option("--at", help="once, at this time (UTC unless stated)")] = None,
    experiment: Annotated[Path | None, typer.Option("--experiment", "-e", help="run this experiment file "
                                                    "(its content as of now)")] = None,
    missed: Annotated[str, typer.Option("--missed", help="a slot missed while no scheduler ran: 'once' runs it "
                                        "late, once; 'skip' waits for the next")] = "once",
) -> None:
    """Add a schedule: `vmorch schedule add nightly --cron "0 2 * * *" -e exp.yaml`, or
    `vmorch schedule add snap --every 1h -- vm snapshot web[1-3] hourly`."""
    from orchestrator.services.schedules import ScheduleSpec  # imported here: croniter and YAML (start-up time)

    st = state(ctx)
    if command:
        check_vm_command(command)
    if missed not in ("once", "skip"):
        raise InvalidInput(f"bad --missed {missed!r}", hint="give --missed once or --missed skip")
    try:
        spec = ScheduleSpec(name=name, namespace=st.namespace, cron=cron, every=every, at=at,
                            experiment=read(experiment) if experiment else None,
                            source=str(experiment) if experiment else "", command=command or None,
                            missed=missed)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidInput((f"{field}: " if field else "") + first["msg"].removeprefix("Value error, "),
                           hint="see 'vmorch schedule add --help'") from None
    show_schedule(st.client.add_schedule(spec), as_json=st.json)


def check_vm_command(command: list[str]) -> None:
    """Parse the command as 'vmorch' would (without running it), so a typo is refused now, not at 2 am."""
    if len(command) < 2 or command[0] != "vm":
        raise InvalidInput(f"can't schedule {' '.join(command)!r}", hint="give a vm command: -- vm snapshot web1 s1")
    group: Any = get_command(vms.app)  # typer's own (vendored) click group
    sub = group.get_command(typer.Context(group), command[1])
    if sub is None:
        raise InvalidInput(f"no vm command {command[1]!r}", hint="see 'vmorch vm --help'")
    try:
        sub.make_context(command[1], list(command[2:]), resilient_parsing=False)
    except Exception as exc:
        if not hasattr(exc, "format_message"):
            raise
        raise InvalidInput(f"vm {command[1]}: {exc.format_message()}", hint=f"see 'vmorch vm {command[1]} --help'") \
            from None


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List the namespace's schedules with their next firing and last run."""
    st = state(ctx)
    items = st.client.schedules(st.namespace)
    if st.json:
        render.dump_json(items)
        return
    if not items:
        render.err.print(f"no schedules in namespace {st.namespace!r}; add one with 'vmorch schedule add'")
        return
    table = render.new_table()
    for col in ("NAME", "WHEN", "WHAT", "STATE", "NEXT", "LAST"):
        table.add_column(col, no_wrap=col != "WHAT")
    for s in items:
        last = f"{render.iso(s.history[0].slot)} {s.history[0].state}" if s.history else "-"
        table.add_row(s.name, s.when, s.what, "paused" if s.paused else "active", render.iso(s.next_at), last)
    render.out.print(table)


@app.command()
def show(ctx: typer.Context, name: Name,
         limit: Annotated[int, typer.Option("--limit", min=1, max=100, help="firings to show")] = 10) -> None:
    """Show a schedule, its next firing and its last firings."""
    st = state(ctx)
    show_schedule(st.client.schedule(st.namespace, name, history=limit), as_json=st.json)


@app.command()
def history(ctx: typer.Context, name: Name,
            limit: Annotated[int, typer.Option("--limit", min=1, max=100)] = 100) -> None:
    """The firings of a schedule, newest first: slot, state, the run or jobs it created."""
    st = state(ctx)
    sched = st.client.schedule(st.namespace, name, history=limit)
    if st.json:
        render.dump_json(sched.history)
    else:
        render.out.print(_history_table(sched))


@app.command()
def pause(ctx: typer.Context, name: Name) -> None:
    """Stop firing a schedule until it is resumed."""
    st = state(ctx)
    show_schedule(st.client.pause_schedule(st.namespace, name, True), as_json=st.json)


@app.command()
def resume(ctx: typer.Context, name: Name) -> None:
    """Fire a paused schedule again (a slot missed meanwhile follows its --missed policy)."""
    st = state(ctx)
    show_schedule(st.client.pause_schedule(st.namespace, name, False), as_json=st.json)


@app.command()
def remove(ctx: typer.Context, name: Name) -> None:
    """Remove a schedule and its history (the jobs it created stay)."""
    st = state(ctx)
    st.client.remove_schedule(st.namespace, name)
    if st.json:
        render.dump_json({"removed": name})
    else:
        render.out.print(f"schedule {name} removed")


def show_schedule(s: Schedule, *, as_json: bool) -> None:
    if as_json:
        render.dump_json(s)
        return
    state_ = "paused" if s.paused else "active"
    render.out.print(f"schedule {s.name} ({s.namespace}): {s.when}, {state_}, missed slots: {s.missed}\n"
                     f"  runs: {s.what}\n  next: {render.iso(s.next_at)}")
    if s.history:
        render.out.print(_history_table(s))


def _history_table(s: Schedule) -> Table:
    table = render.new_table()
    for col in ("SLOT", "FIRED", "STATE", "RUN", "JOBS", "ERROR"):
        table.add_column(col, no_wrap=col != "ERROR")
    for f in s.history:
        table.add_row(render.iso(f.slot), render.iso(f.fired_at), render.styled(f.state),
                      str(f.run) if f.run else "-", ",".join(map(str, f.jobs[:8])) + ("..." if len(f.jobs) > 8 else ""),
                      f.error or "")
    return table


def scheduler(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option("--loglevel", help="DEBUG, INFO, WARNING...")] = "INFO",
    log_format: LogFormat = "text",
) -> None:
    """Run the scheduler: celery beat with RedBeat (one active cluster-wide) and the firings' consumer."""
    from orchestrator.model import logs
    from orchestrator.services import scheduler as process

    logs.setup(log_format, loglevel)
    process.run(state(ctx).settings, loglevel=loglevel.upper())
