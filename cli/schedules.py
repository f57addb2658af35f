"""``vmorch schedule ...`` (recurring or one-off runs) and ``vmorch scheduler`` (the process that fires them)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from typer.main import get_command

from orchestrator.model.errors import InvalidInput
from orchestrator.model.operation import COMMANDS, TargetedOp, invalid_input

from . import launchfiles, render, vmcommands, vms
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
    `vmorch schedule add snap --every 1h -- vm snapshot web[1-3] hourly`.

    The vm command is parsed now, into the operation it makes (its VMs are resolved at each firing)."""
    from orchestrator.services.schedules import ScheduleSpec  # imported here: croniter and YAML (start-up time)

    st = state(ctx)
    operation = parse_vm_command(command) if command else None
    if missed not in ("once", "skip"):
        raise InvalidInput(f"bad --missed {missed!r}", hint="give --missed once or --missed skip")
    try:
        spec = ScheduleSpec(name=name, namespace=st.namespace, cron=cron, every=every, at=at,
                            experiment=read(experiment) if experiment else None,
                            source=str(experiment) if experiment else "",
                            operations=[operation] if operation else None, missed=missed)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidInput((f"{field}: " if field else "") + first["msg"].removeprefix("Value error, "),
                           hint="see 'vmorch schedule add --help'") from None
    show_schedule(st.client.add_schedule(spec), as_json=st.json)


#: options of a vm command that are not its operation's params
_NOT_PARAMS = frozenset({"target", "select", "after", "wait", "dry_run"})
#: a vm command's option -> its operation's param (the rest have the same name)
_RENAMED = {"memory": "memory_mib", "disk": "disk_gib", "timeout": "timeout_s", "host_label": "host_labels",
            "tag": "tags", "pairs": "set", "stdin": "input", "net": "nets"}
#: vm commands that make jobs but can't be scheduled, and why
_UNSCHEDULABLE = {"cp": "it copies between this machine and a guest; schedule 'vm exec' in the guest instead"}
#: params given as key=value pairs
_PAIRS = frozenset({"host_labels", "tags", "set"})
_REFUSED = {"wait": "--wait", "dry_run": "--dry-run", "after": "--after"}


def parse_vm_command(command: list[str]) -> TargetedOp:
    """The operation a vm command makes, parsed as 'vmorch' parses it (without running it), so that
    a typo is refused now, not at 2 am. Its VMs (target, --tag) are resolved when it fires."""
    ops = {word: op for op, word in COMMANDS.items()}
    if len(command) < 2 or command[0] != "vm":
        raise InvalidInput(f"can't schedule {' '.join(command)!r}", hint="give a vm command: -- vm snapshot web1 s1")
    group: Any = get_command(vmcommands.app)  # typer's own (vendored) click group
    sub = group.get_command(typer.Context(group), command[1])
    if sub is None:
        raise InvalidInput(f"no vm command {command[1]!r}", hint="see 'vmorch vm --help'")
    if command[1] in _UNSCHEDULABLE:
        raise InvalidInput(f"can't schedule 'vm {command[1]}': {_UNSCHEDULABLE[command[1]]}",
                           hint=f"see 'vmorch vm {command[1]} --help'")
    if command[1] not in ops:
        raise InvalidInput(f"can't schedule 'vm {command[1]}': it makes no job",
                           hint=f"schedule one of: vm {', '.join(sorted(ops))}; or --experiment FILE")
    try:
        parsed: dict[str, Any] = sub.make_context(command[1], list(command[2:]), resilient_parsing=False).params
    except Exception as exc:
        if not hasattr(exc, "format_message"):
            raise
        raise InvalidInput(f"vm {command[1]}: {exc.format_message()}", hint=f"see 'vmorch vm {command[1]} --help'") \
            from None
    if "select_" in parsed:  # the option's name where 'select' would shadow a builtin module's
        parsed["select"] = parsed.pop("select_")
    given = [flag for key, flag in _REFUSED.items() if parsed.get(key)]
    if given:
        raise InvalidInput(f"a scheduled command doesn't take {given[0]}", hint="drop it")
    params = _params(parsed)
    target = parsed.get("target")
    try:
        return TargetedOp.model_validate({"op": ops[command[1]], "target": None if target == "-" else target,
                                          "tag": vms.parse_tags(parsed.get("select")), "params": params})
    except ValidationError as exc:
        raise invalid_input(exc) from None


def _params(parsed: dict[str, Any]) -> dict[str, Any]:
    """The operation's params from a vm command's parsed options. A launch's files are read now, as
    'vm launch' reads them: the schedule keeps their content, not their paths."""
    params: dict[str, Any] = {}
    cloud_init, ssh_key = parsed.pop("cloud_init", None), parsed.pop("ssh_key", None)
    if cloud_init is not None:
        params["cloud_init"] = launchfiles.user_data(cloud_init)
    if ssh_key:
        params["ssh_keys"] = launchfiles.ssh_keys(ssh_key)
    shaping = vms.shaping(parsed.pop("delay", None), parsed.pop("loss", None), parsed.pop("rate", None))
    if shaping is not None:
        params["shaping"] = shaping
    for key, value in parsed.items():
        if key not in _NOT_PARAMS and value is not None:
            param = _RENAMED.get(key, key)
            params[param] = vms.parse_tags(value) if param in _PAIRS else value
    return params


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
