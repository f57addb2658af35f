"""``vmorch up``, ``vmorch down`` and ``vmorch worker``: running the parts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.model.errors import InvalidInput
from orchestrator.model.names import check_name

from . import render
from .context import LogFormat, state
from .vms import parse_tags


def up(
    ctx: typer.Context,
    hosts: Annotated[int, typer.Option("--hosts", min=1, max=64, help="number of host workers")] = 2,
    libvirt_uri: Annotated[str | None, typer.Option(
        "--libvirt-uri", help="hypervisor of every host (default: embedded QEMU if installed, else test:///default)")
    ] = None,
    api_port: Annotated[int | None, typer.Option("--api-port", min=1, max=65535,
                                                 help="port of the HTTP API (default: a free port)")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="return once every host is up")] = False,
) -> None:
    """Start a local cluster (Redis, host workers, HTTP API with an admin token) under VMORCH_HOME."""
    from orchestrator import localcluster
    from orchestrator.store.redisconn import redact

    st = state(ctx)
    info = localcluster.up(st.settings, hosts=hosts, libvirt_uri=libvirt_uri, api_port=api_port, detach=detach,
                           on_event=lambda line: render.err.print(line))
    if st.json:
        render.dump_json(info)
    elif detach:
        render.out.print(f"local cluster up: {len(info.hosts)} hosts, Redis at {redact(info.redis_url)}")
        if info.api_url:
            render.out.print(f"HTTP API at {info.api_url}; its admin token is in {info.home / 'token'} "
                             f"(used with VMORCH_API_URL={info.api_url})")
            render.out.print("more tokens: vmorch token create NAME --role read|operate|admin --namespace NS")
            render.out.print(f"dashboard: {info.api_url}/ui/ (sign in with a token)")
        render.out.print("try: vmorch vm launch web1 --wait; stop it with: vmorch down")


def down(
    ctx: typer.Context,
    purge: Annotated[bool, typer.Option("--purge", help="also delete the cluster's state under VMORCH_HOME")] = False,
) -> None:
    """Stop the local cluster: workers, QEMU domains, Redis."""
    from orchestrator import localcluster

    localcluster.down(state(ctx).settings, purge=purge, on_event=lambda line: render.err.print(line))


def check_underlay(value: str) -> str:
    import ipaddress

    if not value:
        return ""
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidInput(f"--underlay: {value[:60]!r} is not an IPv4 address",
                           hint="give this host's address on the network between hosts, e.g. 10.0.0.11") from None


def worker(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="this host's name in the cluster")],
    libvirt_uri: Annotated[str, typer.Option("--libvirt-uri", help="this host's hypervisor")] = "qemu:///system",
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=256, help="worker threads")] = 4,
    storage_dir: Annotated[Path | None, typer.Option("--storage-dir", help="where VM disks are created")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="key=value, repeatable")] = None,
    migrate_uri: Annotated[str, typer.Option(
        "--migrate-uri", help="how other hosts' libvirtd reach this one for live moves, e.g. qemu+tcp://HOST/system")
    ] = "",
    shared_storage: Annotated[bool, typer.Option(
        "--shared-storage", help="the disk directory is on storage every host sees at the same path")] = False,
    log_format: LogFormat = "text",
    metrics_port: Annotated[int, typer.Option(
        "--metrics-port", envvar="VMORCH_METRICS_PORT", min=0, max=65535,
        help="serve Prometheus metrics on this port (0: off)")] = 0,
    task_events: Annotated[bool, typer.Option(
        "--task-events", help="send Celery task events from the start (Flower turns them on by itself)")] = False,
    share: Annotated[int, typer.Option(
        "--share", min=1, max=1024, show_default=False,
        help="this host is one of N sharing one machine: offer 1/N of its memory and CPUs to placement")] = 1,
    underlay: Annotated[str, typer.Option(
        "--underlay", show_default=False,
        help="this host's address between hosts, for vmorch networks' VXLAN (UDP 4789; default: the address "
             "it reaches Redis from)")] = "",
) -> None:
    """Run the worker of one host (consumes the queue host.<name>)."""
    from orchestrator.model import logs
    from worker.main import run

    logs.setup(log_format, loglevel)
    run(state(ctx).settings, check_name(host, "host name"), libvirt_uri, concurrency=concurrency,
        storage_dir=storage_dir, loglevel=loglevel.upper(), labels=parse_tags(label), migrate_uri=migrate_uri,
        shared_storage=shared_storage, metrics_port=metrics_port, task_events=task_events, share=share,
        underlay=check_underlay(underlay))
