"""``vmorch vm ...``: each command builds operations and hands them to the client."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.control.targets import resolve
from orchestrator.model.errors import InvalidInput, NotFound
from orchestrator.model.names import check_name, check_tag, check_text, expand_target
from orchestrator.model.operation import Op, Operation, SubmitOptions
from orchestrator.model.records import HostState, Job

from . import completion, launchfiles, render
from .context import state
from .waiting import report_jobs

if TYPE_CHECKING:
    from orchestrator.services.client import Client

app = typer.Typer(help="Operate on VMs. TARGET is a name, a list a,b or a range such as web[1-10]; "
                       "--tag key=value selects VMs by their tags.", no_args_is_help=True)

NewTarget = Annotated[str, typer.Argument(help="a VM name, a list a,b, or a range such as web[1-10] or web[1,3,5-7]")]
Target = Annotated[str | None, typer.Argument(
    help="a VM name, a list a,b, or a range such as web[1-10] or web[1,3,5-7] (or none, with --tag)",
    autocompletion=completion.vm_names)]
VmName = Annotated[str, typer.Argument(help="VM name", autocompletion=completion.vm_names)]
Select = Annotated[list[str] | None, typer.Option(
    "--tag", "-t", help="only VMs with this tag key=value (repeatable: all must match)")]
After = Annotated[str | None, typer.Option(
    "--after", help="run only once these jobs succeeded: ID[,ID...] (fails if one of them fails)")]
Wait = Annotated[bool, typer.Option("--wait", "-w", help="wait until the jobs are final; exit 1 if one failed")]


def submit(ctx: typer.Context, op: Op, target: str | None, wait: bool, *, select: list[str] | None = None,
           after: str | None = None, **params: Any) -> None:
    st = state(ctx)
    params = {k: v for k, v in params.items() if v is not None}
    names = resolve(st.client, st.namespace, target, parse_tags(select))
    ops = [Operation.build(op, st.namespace, name, **params) for name in names]
    label = target or ",".join(select or [])
    jobs = st.client.submit(ops, SubmitOptions(after=parse_ids(after), label=label,
                                               idempotency_key=st.idempotency_key))
    warn_down_hosts(st.client, jobs, st.settings.host_down_deadline)
    report_jobs(st, jobs, wait)


def parse_ids(value: str | None) -> list[int]:
    ids = []
    for part in (value or "").split(","):
        if not part.strip():
            continue
        if not (part.strip().isascii() and part.strip().isdigit()):  # "²".isdigit(), yet int("²") fails
            raise InvalidInput(f"bad job id {part!r} in --after", hint="write --after ID[,ID...], e.g. --after 12,13")
        ids.append(int(part))
    return ids


def warn_down_hosts(client: Client, jobs: list[Job], deadline: float) -> None:
    down = {h.name for h in client.hosts() if h.state is HostState.DOWN}
    for host in sorted({j.host for j in jobs} & down):
        render.err.print(f"[yellow]warning:[/yellow] host {host} is down; its jobs wait for it up to "
                         f"{deadline:.0f}s, then fail (see 'vmorch host list')")


def parse_tags(pairs: list[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"bad tag {pair!r}", hint="write tags as key=value")
        check_tag(key, value)
        tags[key] = value
    return tags


@app.command()
def launch(
    ctx: typer.Context, target: NewTarget,
    memory: Annotated[int, typer.Option("--memory", "-m", help="memory in MiB")] = 128,
    vcpus: Annotated[int, typer.Option("--vcpus", "-c", help="virtual CPUs")] = 1,
    disk: Annotated[int, typer.Option("--disk", help="size in GiB of the qcow2 disk vmorch creates (0: none)")] = 1,
    image: Annotated[str | None, typer.Option("--image", help="a catalog image ('vmorch image list'): the disk is "
                                                                "a copy-on-write overlay of it")] = None,
    cloud_init: Annotated[Path | None, typer.Option("--cloud-init", help="cloud-init user-data FILE (read here, "
                                                                          "sent as content; needs --image)")] = None,
    ssh_key: Annotated[list[Path] | None, typer.Option("--ssh-key", help="an SSH public key FILE (.pub) for the "
                                                                         "guest, repeatable (needs --image)")] = None,
    host: Annotated[str | None, typer.Option("--host", help="pin to this host (default: placement chooses)")] = None,
    host_label: Annotated[list[str] | None, typer.Option("--host-label", help="only hosts with key=value")] = None,
    colocate: Annotated[str | None, typer.Option("--colocate", help="on the same host as this VM")] = None,
    spread: Annotated[bool, typer.Option("--spread", help="a range goes round the hosts")] = False,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="key=value, repeatable")] = None,
    net: Annotated[list[str] | None, typer.Option(
        "--net", help="a NIC on this network ('vmorch net list'); repeatable, in order (default: a user-mode NIC)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print where the VMs would go; change nothing")] = False,
    wait: Wait = False,
) -> None:
    """Define and start new VMs, placed on the up host with the least committed memory that fits."""
    if image is not None:
        check_text(image, "--image")  # an undecodable byte of argv arrives as a lone surrogate
    params: dict[str, Any] = dict(memory_mib=memory, vcpus=vcpus, disk_gib=disk, image=image, host=host,
                                  host_labels=parse_tags(host_label), colocate=colocate, spread=spread,
                                  tags=parse_tags(tag), cloud_init=launchfiles.user_data(cloud_init),
                                  ssh_keys=launchfiles.ssh_keys(ssh_key), nets=net or [])
    if dry_run:
        st = state(ctx)
        ops = [Operation.build(Op.LAUNCH, st.namespace, name, **params) for name in expand_target(target)]
        plan = st.client.plan(ops)
        if st.json:
            render.dump_json({"plan": [{"vm": vm, "host": host} for vm, host in plan.items()]})
        else:
            for vm, chosen in plan.items():
                render.out.print(f"{vm} -> {chosen}")
            render.err.print("dry run: nothing was launched")
        return
    submit(ctx, Op.LAUNCH, target, wait, **params)


def _simple(op: Op, doc: str) -> None:
    def command(ctx: typer.Context, target: Target = None, select: Select = None, after: After = None,
                wait: Wait = False) -> None:
        submit(ctx, op, target, wait, select=select, after=after)

    command.__doc__ = doc
    app.command(name=op.value)(command)


_simple(Op.START, "Start shut-off VMs (a running VM is a successful no-op).")
_simple(Op.KILL, "Power VMs off at once (a shut-off VM is a successful no-op).")
_simple(Op.PAUSE, "Pause running VMs.")
_simple(Op.RESUME, "Resume paused VMs.")
_simple(Op.DELETE, "Delete VMs: power off, undefine, remove the storage vmorch created.")


Timeout = Annotated[float, typer.Option(
    "--timeout", min=0, max=3600,
    help="seconds the guest gets (the request is repeated every 3 s); 0: one request, no wait")]


@app.command()
def stop(
    ctx: typer.Context, target: Target = None, select: Select = None, after: After = None,
    force: Annotated[bool, typer.Option("--force", help="power off at once: no shutdown request, no wait")] = False,
    timeout: Timeout = 60.0,
    force_after_timeout: Annotated[bool, typer.Option(
        "--force-after-timeout", help="power off once --timeout passed, instead of failing")] = False,
    wait: Wait = False,
) -> None:
    """Shut VMs down: the ACPI power button, pressed again every 3 s until the guest is off. Past
    --timeout the job fails (with --force-after-timeout: powers off). --force powers off at once;
    --timeout 0 presses once and does not wait."""
    if force and force_after_timeout:
        raise typer.BadParameter("give --force (at once) or --force-after-timeout (after the graceful try), not both")
    submit(ctx, Op.STOP, target, wait, select=select, after=after, force=force, timeout_s=timeout,
           force_after_timeout=force_after_timeout)


@app.command()
def reboot(
    ctx: typer.Context, target: Target = None, select: Select = None, after: After = None,
    force: Annotated[bool, typer.Option("--force", help="reset at once (no clean shutdown)")] = False,
    timeout: Timeout = 60.0, wait: Wait = False,
) -> None:
    """Reboot running VMs: a reboot request to the guest, repeated every 3 s until it resets; fails if it
    did not within --timeout. --force resets at once; --timeout 0 asks once and does not wait."""
    submit(ctx, Op.REBOOT, target, wait, select=select, after=after, force=force, timeout_s=timeout)


@app.command(name="set")
def set_(
    ctx: typer.Context, target: Target = None, select: Select = None, after: After = None,
    memory: Annotated[int | None, typer.Option("--memory", "-m", help="memory in MiB")] = None,
    vcpus: Annotated[int | None, typer.Option("--vcpus", "-c", help="virtual CPUs")] = None,
    nic: Annotated[int | None, typer.Option("--nic", help="the NIC (0, 1, ... as 'vm show' lists them) whose "
                                                          "link emulation --delay, --loss, --rate set")] = None,
    delay: Annotated[str | None, typer.Option("--delay", help="delay towards the guest, e.g. 20ms (0: none)")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="loss towards the guest, e.g. 1% (0: none)")] = None,
    rate: Annotated[str | None, typer.Option("--rate", help="rate towards the guest, e.g. 10mbit (0: none)")] = None,
    wait: Wait = False,
) -> None:
    """Change memory or vCPUs (always in the definition, live too where libvirt allows), or a NIC's link
    emulation (tc on its host: recorded, applied now if it runs and at every start)."""
    submit(ctx, Op.SET, target, wait, select=select, after=after, memory_mib=memory, vcpus=vcpus, nic=nic,
           shaping=shaping(delay, loss, rate))


def shaping(delay: str | None, loss: str | None, rate: str | None) -> dict[str, Any] | None:
    """``vm set``'s --delay, --loss and --rate as the operation's ``shaping`` (None: none given)."""
    from orchestrator.model.network import parse_delay, parse_loss, parse_rate

    if delay is None and loss is None and rate is None:
        return None
    return {"delay_ms": parse_delay(delay) if delay is not None else None,
            "loss_pct": parse_loss(loss) if loss is not None else None,
            "rate_kbit": parse_rate(rate) if rate is not None else None}


@app.command()
def snapshot(ctx: typer.Context, target: Target, name: Annotated[str, typer.Argument(help="snapshot name")],
             select: Select = None, after: After = None, wait: Wait = False) -> None:
    """Take a snapshot of VMs (TARGET is required here: use a range, or '-' with --tag)."""
    submit(ctx, Op.SNAPSHOT, _dash(target), wait, select=select, after=after, name=name)


@app.command()
def revert(ctx: typer.Context, target: Target, name: Annotated[str, typer.Argument(help="snapshot name")],
           select: Select = None, after: After = None, wait: Wait = False) -> None:
    """Revert VMs to a snapshot (TARGET is required here: use a range, or '-' with --tag)."""
    submit(ctx, Op.REVERT, _dash(target), wait, select=select, after=after, name=name)


@app.command(name="snapshot-delete")
def snapshot_delete(ctx: typer.Context, target: Target,
                    name: Annotated[str, typer.Argument(help="snapshot name")],
                    select: Select = None, after: After = None, wait: Wait = False) -> None:
    """Delete a snapshot of VMs (TARGET is required here: use a range, or '-' with --tag)."""
    submit(ctx, Op.SNAPSHOT_DELETE, _dash(target), wait, select=select, after=after, name=name)


def _dash(target: str | None) -> str | None:
    """'-' stands for "no TARGET" where a positional argument follows it."""
    return None if target == "-" else target


@app.command()
def tag(
    ctx: typer.Context, target: Target,
    pairs: Annotated[list[str] | None, typer.Argument(help="key=value to set")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", "-r", help="tag key to remove, repeatable")] = None,
    select: Select = None, after: After = None, wait: Wait = False,
) -> None:
    """Set or remove tags (select VMs by their tags with TARGET '-' and --tag)."""
    submit(ctx, Op.TAG, _dash(target), wait, select=select, after=after, set=parse_tags(pairs), remove=remove or [])


@app.command()
def move(
    ctx: typer.Context,
    to: Annotated[str, typer.Option("--to", help="the host to move to")],
    target: Target = None, select: Select = None,
    live: Annotated[bool, typer.Option("--live", help="live migration (needs libvirtd on both hosts)")] = False,
    wait: Wait = False,
) -> None:
    """Move shut-off VMs to another host: definition and disk go along (two jobs: out, then in)."""
    submit(ctx, Op.MOVE_OUT, target, wait, select=select, to=to, live=live)


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List the VMs of the namespace."""
    st = state(ctx)
    render.listing(st.client.vms(st.namespace), render.vms_table, as_json=st.json,
                   empty=f"no VMs in namespace {st.namespace!r}; launch one with 'vmorch vm launch NAME'")


@app.command()
def show(ctx: typer.Context, name: VmName) -> None:
    """Show one VM."""
    st = state(ctx)
    vm = st.client.vm(st.namespace, name)
    if st.json:
        render.dump_json(vm)
    else:
        render.out.print(render.vm_detail(vm))


@app.command()
def history(ctx: typer.Context, name: VmName,
            limit: Annotated[int, typer.Option("--limit", min=1, max=100_000)] = 100) -> None:
    """Show what happened to a VM: its jobs' state changes and the changes of its record."""
    st = state(ctx)
    found = st.client.history(st.namespace, vm=check_name(name), limit=limit)
    events = found.events
    if st.json:
        render.dump_json(events)
    elif events:
        render.out.print(render.events_table(events))
        if found.trimmed:
            render.out.print(f"(older history trimmed: {found.trimmed} earlier entries are no longer kept)")
    else:
        raise NotFound(f"no history for VM {name!r} in namespace {st.namespace!r}",
                       hint="list VMs with 'vmorch vm list' (and check --namespace)")
