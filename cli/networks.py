"""``vmorch net ...``: a namespace's networks (one L2 segment across its hosts, with DHCP and NAT)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.model.errors import InvalidInput
from orchestrator.model.names import check_name

from . import render
from .context import state

if TYPE_CHECKING:
    from rich.table import Table

    from orchestrator.model.network import Network

app = typer.Typer(help="Networks: named L2 segments of a namespace that span its hosts ('vm launch --net NAME').",
                  no_args_is_help=True)

NetName = Annotated[str, typer.Argument(help="network name (the rules of a VM's name)")]
Timeout = Annotated[float, typer.Option("--timeout", min=0, help="how long to wait for the gateway host (s)")]


def _name(value: str) -> str:
    return check_name(value, "network name")


@app.command()
def create(
    ctx: typer.Context, name: NetName,
    subnet: Annotated[str, typer.Option("--subnet", help="its IPv4 subnet, e.g. 10.10.0.0/24 (/16 to /29)")],
    no_dhcp: Annotated[bool, typer.Option("--no-dhcp", help="no DHCP server: guests set their addresses")] = False,
    nat: Annotated[bool, typer.Option("--nat", help="guests reach outside addresses through the gateway host "
                                                    "(masquerade; an admin's choice over the API)")] = False,
    host: Annotated[str | None, typer.Option("--host", help="the gateway host (default: the up host with "
                                                            "the fewest gateways)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until its gateway is up")] = True,
    timeout: Timeout = 60.0,
) -> None:
    """Create a network. Its gateway host holds its first address, its DHCP server and its NAT; a
    host's bridge of it comes with the host's first VM on it and goes with the last."""
    from pydantic import ValidationError

    from orchestrator.model.network import NetworkSpec
    from orchestrator.model.operation import invalid_input

    st = state(ctx)
    try:
        spec = NetworkSpec(name=_name(name), subnet=subnet, dhcp=not no_dhcp, nat=nat, host=host)
    except ValidationError as exc:
        raise invalid_input(exc) from None
    net = st.client.create_network(st.namespace, spec)
    if wait and net.state != "ready":
        net = st.client.wait_network(st.namespace, net.name, gone=False, timeout=timeout) or net
    _print(st.json, net, f"network {net.name} {net.state}: {net.subnet}, VNI {net.vni}"
                         + (f", gateway {net.gateway} on host {net.gateway_host}" if net.gateway_host else ""))


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List the namespace's networks."""
    st = state(ctx)
    render.listing(st.client.networks(st.namespace), _table, as_json=st.json,
                   empty="no network in this namespace; create one with 'vmorch net create NAME --subnet CIDR'")


@app.command()
def show(ctx: typer.Context, name: NetName) -> None:
    """Show one network: VNI, gateway, the hosts it is up on, its DHCP leases."""
    st = state(ctx)
    net = st.client.network(st.namespace, _name(name))
    if st.json:
        render.dump_json(net)
        return
    table = render.new_table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [("name", net.name), ("state", net.state + (f" ({net.error})" if net.error else "")),
            ("subnet", net.subnet), ("vni", str(net.vni)), ("dhcp", "yes" if net.dhcp else "no"),
            ("nat", "yes" if net.nat else "no"),
            ("gateway", f"{net.gateway} on host {net.gateway_host}" if net.gateway_host else "- (none)"),
            ("up on", ", ".join(f"{h} ({a})" for h, a in sorted(net.hosts.items())) or "-"),
            ("created", f"{render.when(_dt(net.created_at))} by {net.by}")]
    rows += [(f"lease {mac}", ip) for mac, ip in sorted(net.leases.items(), key=lambda kv: kv[1])]
    for field, value in rows:
        table.add_row(field, render.escape(value))
    render.out.print(table)


@app.command()
def delete(
    ctx: typer.Context, name: NetName,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until its gateway is torn down")] = True,
    timeout: Timeout = 60.0,
) -> None:
    """Delete a network (refused while a VM has a NIC on it)."""
    st = state(ctx)
    net = st.client.delete_network(st.namespace, _name(name))
    if wait:
        st.client.wait_network(st.namespace, net.name, gone=True, timeout=timeout)
    if st.json:
        render.dump_json({"name": net.name, "deleted": wait})
    else:
        render.out.print(f"network {net.name} {'deleted' if wait else 'being deleted'}")


@app.command()
def capture(
    ctx: typer.Context, name: NetName,
    output: Annotated[Path, typer.Option("--output", "-o", help="the pcap file to write (here, on your machine)")],
    seconds: Annotated[float, typer.Option("--seconds", min=0.1, max=300, help="how long to capture")] = 10.0,
    vm: Annotated[str | None, typer.Option("--vm", help="capture on this VM's NIC on the network (default: at "
                                                        "the network's gateway host)")] = None,
) -> None:
    """Capture the network's packets for some seconds into a pcap file (tcpdump on the host's bridge
    or the VM's tap; cut at 16 MiB)."""
    st = state(ctx)
    if output.exists() and output.is_dir():
        raise InvalidInput(f"--output: {output} is a directory", hint="give a file name, e.g. -o net.pcap")
    data = st.client.capture(st.namespace, _name(name), vm=check_name(vm) if vm else None, seconds=seconds)
    output.write_bytes(data)
    packets = _pcap_packets(data)
    if st.json:
        render.dump_json({"file": str(output), "bytes": len(data), "packets": packets})
    else:
        render.out.print(f"{packets} packets, {len(data)} bytes in {render.escape(str(output))}")


def _pcap_packets(data: bytes) -> int:
    """Records in a classic pcap file (its 24-byte header, then a 16-byte header per packet)."""
    if len(data) < 24:
        return 0
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    count, at = 0, 24
    while at + 16 <= len(data):
        (caplen,) = struct.unpack_from(order + "I", data, at + 8)
        at += 16 + caplen
        count += 1
    return count


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=UTC) if value else None


def _print(as_json: bool, net: Network, line: str) -> None:
    if as_json:
        render.dump_json(net)
    else:
        render.out.print(render.escape(line))


def _table(nets: Sequence[Network]) -> Table:
    table = render.new_table()
    for column in ("name", "subnet", "state", "vni", "dhcp", "nat", "gateway host", "up on"):
        table.add_column(column)
    for n in nets:
        table.add_row(render.escape(n.name), n.subnet, n.state, str(n.vni), "yes" if n.dhcp else "no",
                      "yes" if n.nat else "no", render.escape(n.gateway_host or "-"),
                      render.escape(", ".join(sorted(n.hosts)) or "-"))
    return table
