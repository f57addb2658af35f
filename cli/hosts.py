"""``vmorch host ...``."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.model.errors import NotFound

from . import completion, render
from .context import state

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
    """Show one host: state, capacity and what is committed, labels, its VMs."""
    st = state(ctx)
    host = next((h for h in st.client.hosts() if h.name == name), None)
    if host is None:
        raise NotFound(f"unknown host {name!r}", hint="see 'vmorch host list'")
    if st.json:
        render.dump_json(host)
    else:
        render.out.print(render.hosts_table([host]))


@app.command()
def drain(ctx: typer.Context, name: HostName) -> None:
    """Place no new VMs on a host; its VMs and their jobs carry on."""
    _set_draining(ctx, name, True)


@app.command()
def undrain(ctx: typer.Context, name: HostName) -> None:
    """Let placement use a drained host again."""
    _set_draining(ctx, name, False)


def _set_draining(ctx: typer.Context, name: str, draining: bool) -> None:
    st = state(ctx)
    host = st.client.drain(name, draining)
    if st.json:
        render.dump_json(host)
    else:
        render.out.print(render.hosts_table([host]))
