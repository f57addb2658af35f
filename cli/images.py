"""``vmorch image ...``: the catalog of images VMs are launched from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.model.guestdata import check_image_name
from orchestrator.model.names import check_text

from . import render
from .context import state
from .waiting import report_jobs

if TYPE_CHECKING:
    from rich.table import Table

    from orchestrator.store.images import Image

app = typer.Typer(help="The image catalog: images VMs are launched from ('vm launch --image NAME').",
                  no_args_is_help=True)

ImageName = Annotated[str, typer.Argument(help="image name (the rules of a VM's name)")]
Wait = Annotated[bool, typer.Option("--wait", "-w", help="wait until the jobs are final; exit 1 if one failed")]


@app.command(name="import")
def import_(
    ctx: typer.Context, name: ImageName,
    source: Annotated[str, typer.Argument(help="http(s)://... URL, or file:///PATH on the hosts (admins only)")],
    sha256: Annotated[str | None, typer.Option("--sha256", help="the source's sha256: checked on every host")] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="import to this host (repeatable; "
                                                                  "default: every host that is up)")] = None,
    wait: Wait = False,
) -> None:
    """Fetch an image into hosts' image stores: one job per host. Refused: a backing file, a format
    other than qcow2 and raw (raw is converted), a sha256 that doesn't match, a source over the size cap."""
    check_image_name(name)
    check_text(source, "source")
    st = state(ctx)
    # Talking to Redis directly is an admin's way in already: file:// is allowed; the API asks the token.
    jobs = st.client.import_image(name, source, sha256=sha256, hosts=host or None, allow_file=True)
    report_jobs(state(ctx), jobs, wait)


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List the catalog: each image and where it is ready."""
    st = state(ctx)
    render.listing(st.client.images(), _images_table, as_json=st.json,
                   empty="no image in the catalog; an admin adds one with 'vmorch image import NAME URL'")


@app.command()
def show(ctx: typer.Context, name: ImageName) -> None:
    """Show one image: its source, sha256, sizes, and its state and last job on each host."""
    st = state(ctx)
    image = st.client.image(check_image_name(name))
    if st.json:
        render.dump_json(image)
        return
    table = render.new_table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for field, value in (("name", image.name), ("source", image.source), ("sha256", image.sha256 or "-"),
                         ("format", image.format), ("size", _mib(image.size_bytes)),
                         ("virtual size", _mib(image.virtual_size_bytes)), ("created", render.when(image.created_at))):
        table.add_row(field, render.escape(value))
    for host_name, host_state in sorted(image.hosts.items()):
        why = image.errors.get(host_name, "")
        table.add_row(f"host {host_name}", render.escape(f"{host_state} (job {image.jobs.get(host_name)})"
                                                         + (f": {why}" if why else "")))
    render.out.print(table)


@app.command()
def remove(ctx: typer.Context, name: ImageName, wait: Wait = False) -> None:
    """Remove an image from the catalog and the hosts' stores (refused while a VM uses it)."""
    st = state(ctx)
    jobs = st.client.remove_image(check_image_name(name))
    if not jobs:
        if st.json:
            render.dump_json([])
        else:
            render.out.print(f"image {name} removed (no host had it)")
        return
    report_jobs(state(ctx), jobs, wait)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size else "-"


def _images_table(images: Sequence[Image]) -> Table:
    table = render.new_table()
    for column in ("name", "sha256", "size", "hosts"):
        table.add_column(column)
    for image in images:
        hosts = ", ".join(f"{h}:{s}" for h, s in sorted(image.hosts.items())) or "-"
        table.add_row(render.escape(image.name), image.sha256[:12] or "-", _mib(image.size_bytes),
                      render.escape(hosts))
    return table
