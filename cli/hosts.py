"""``vmorch host ...``."""

from __future__ import annotations

import typer

from . import render
from .context import state

app = typer.Typer(help="Hosts of the cluster.", no_args_is_help=True)


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List hosts with their state, heartbeat and capacity."""
    st = state(ctx)
    hosts = st.client.hosts()
    if st.json:
        render.dump_json(hosts)
    elif hosts:
        render.out.print(render.hosts_table(hosts))
    else:
        render.err.print("no host registered; start a worker with 'vmorch up' or 'vmorch worker --host NAME'")
