"""``vmorch ns ...``: namespaces scope VMs, jobs and history; they may be limited to some hosts."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.model.errors import NotFound
from orchestrator.model.records import Quota

from . import completion, render
from .context import state
from .waiting import wait as wait_for

NamespaceName = Annotated[str, typer.Argument(help="namespace name", autocompletion=completion.namespace_names)]

app = typer.Typer(help="Namespaces.", no_args_is_help=True)


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List namespaces with their VM counts and hosts."""
    st = state(ctx)
    render.listing(st.client.namespaces(), render.namespaces_table, as_json=st.json,
                   empty="no namespaces yet; launching a VM creates its namespace")


@app.command()
def create(
    ctx: typer.Context, name: NamespaceName,
    hosts: Annotated[str | None, typer.Option("--hosts", help="comma-separated hosts its VMs may use")] = None,
) -> None:
    """Create a namespace, optionally limited to some hosts."""
    st = state(ctx)
    ns = st.client.create_namespace(name, [h for h in hosts.split(",") if h] if hosts else None)
    if st.json:
        render.dump_json(ns)
    else:
        render.out.print(render.namespaces_table([ns]))


def _limit(value: str | None, option: str) -> int | None:
    """An option's limit: None = not given; 0 = clear it (``0`` or ``none``)."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return 0
    try:
        limit = int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a whole number or 'none'", param_hint=option) from None
    if limit < 0:
        raise typer.BadParameter("a limit can't be negative (0 or 'none' clears it)", param_hint=option)
    return limit


@app.command()
def quota(
    ctx: typer.Context, name: NamespaceName,
    vms: Annotated[str | None, typer.Option("--vms", help="most VMs (0 or none: no limit)")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="most memory, MiB, of all its VMs")] = None,
    vcpus: Annotated[str | None, typer.Option("--vcpus", help="most vCPUs of all its VMs")] = None,
    disk: Annotated[str | None, typer.Option("--disk", help="most disk, GiB, of all its VMs")] = None,
) -> None:
    """Show a namespace's quota, or change some of its limits (0 or none clears one)."""
    st = state(ctx)
    changes = Quota(vms=_limit(vms, "--vms"), memory_mib=_limit(memory, "--memory"),
                    vcpus=_limit(vcpus, "--vcpus"), disk_gib=_limit(disk, "--disk"))
    if changes != Quota():
        # only the limits given, merged on the server in one step: a concurrent change of another
        # limit is not overwritten with what this command would have read before it
        found = st.client.update_quota(name, changes)
    else:
        shown = next((ns for ns in st.client.namespaces() if ns.name == name), None)
        if shown is None:
            raise NotFound(f"no namespace {name!r}", hint="see 'vmorch ns list'")
        found = shown
    if st.json:
        render.dump_json(found)
    else:
        render.out.print(render.namespaces_table([found]))


@app.command()
def delete(
    ctx: typer.Context, name: NamespaceName,
    force: Annotated[bool, typer.Option("--force", help="also delete its VMs (through ordinary jobs)")] = False,
) -> None:
    """Delete a namespace, its jobs and its history; with --force, its VMs first."""
    st = state(ctx)
    jobs = st.client.delete_namespace(name, force=force)
    if jobs:
        jobs = wait_for(st.client, jobs)
        if render.any_failed(jobs):
            for job in jobs:
                render.out.print(render.job_line(job))
            raise typer.Exit(1)
    removed = st.client.finish_namespace_delete(name)
    if st.json:
        render.dump_json({"namespace": name, "deleted_vms": len(jobs), "removed_keys": removed})
    else:
        render.out.print(f"namespace {name} deleted ({len(jobs)} VMs)")
