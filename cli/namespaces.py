"""``vmorch ns ...``: namespaces scope VMs, jobs and history; they may be limited to some hosts."""

from __future__ import annotations

from typing import Annotated

import typer

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
