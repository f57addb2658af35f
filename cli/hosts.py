"""``vmorch host ...``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.model.errors import NotFound
from orchestrator.model.names import check_host_name

from . import completion, render
from .context import state

if TYPE_CHECKING:
    from orchestrator.services.client import Client

HostName = Annotated[str, typer.Argument(help="host name", autocompletion=completion.host_names)]

app = typer.Typer(help="Hosts of the cluster.", no_args_is_help=True)


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List hosts with their state, heartbeat and capacity."""
    st = state(ctx)
    render.listing(st.client.hosts(), render.hosts_table, as_json=st.json,
                   empty="no host registered; start a worker with 'vmorch up' or 'vmorch worker --host NAME'")


@app.command()
def show(ctx: typer.Context, name: HostName) -> None:
    """Show one host: its whole record (capacity and what is committed, libvirt and its probe,
    clock, version, labels) and its VMs by namespace."""
    check_host_name(name)
    st = state(ctx)
    host = next((h for h in st.client.hosts() if h.name == name), None)
    if host is None:
        raise NotFound(f"unknown host {name!r}", hint="see 'vmorch host list'")
    vms = vms_by_namespace(st.client, name)
    if st.json:
        render.dump_json({**host.model_dump(mode="json"), "vms_by_namespace": vms})
    else:
        render.out.print(render.host_detail(host, vms))


def vms_by_namespace(client: Client, host: str) -> dict[str, list[str]]:
    """The names of the VMs on ``host``, by namespace: of the namespaces the client can see."""
    found: dict[str, list[str]] = {}
    for ns in client.namespaces():
        if ns.vms:
            names = sorted(vm.name for vm in client.vms(ns.name) if vm.host == host)
            if names:
                found[ns.name] = names
    return found


@app.command()
def drain(ctx: typer.Context, name: HostName) -> None:
    """Place no new VMs on a host; its VMs and their jobs carry on."""
    _set_draining(ctx, name, True)


@app.command()
def undrain(ctx: typer.Context, name: HostName) -> None:
    """Let placement use a drained host again."""
    _set_draining(ctx, name, False)


def _set_draining(ctx: typer.Context, name: str, draining: bool) -> None:
    check_host_name(name)
    st = state(ctx)
    host = st.client.drain(name, draining)
    if st.json:
        render.dump_json(host)
    else:
        render.out.print(render.hosts_table([host]))
