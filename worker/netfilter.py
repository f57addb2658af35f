"""The nftables side of vmorch networks: one table, ``inet vmorch``, shared by every vmorch host that
runs in this network namespace (the local cluster runs several workers in one).

The rules never change after the table is made; each network only adds or removes elements of its
own (its bridge's name, its NAT subnet), so no caller ever flushes or rewrites another network's
state. The table is made in one transaction that starts with ``create table``: of two processes
making it at once, exactly one succeeds and the other's whole transaction fails with EEXIST, so the
rules are never doubled.

br_netfilter (bridge-nf-call-iptables=1, per network namespace) sends frames bridged between two
ports of one bridge through the inet forward hook with iifname = oifname = the bridge: the
``intra`` set lets exactly that pass, bridge by bridge.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from typing import Any

from orchestrator.model.errors import ExecError

BRIDGE_PREFIX = "vmbr"
TABLE = "vmorch"
#: the table's comment: a table made by another layout of these rules is refused, not patched
LAYOUT = "vmorch networks 1"

_GLOB = f'"{BRIDGE_PREFIX}*"'
_RULES = f"""\
create table inet {TABLE} {{ comment "{LAYOUT}"; }}
add set inet {TABLE} intra {{ type ifname . ifname; }}
add set inet {TABLE} nat_ifs {{ type ifname; }}
add set inet {TABLE} nat_nets {{ type ipv4_addr; flags interval; }}
add chain inet {TABLE} input {{ type filter hook input priority filter; policy accept; }}
add chain inet {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}
add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add rule inet {TABLE} input iifname {_GLOB} meta nfproto ipv4 udp sport 68 udp dport 67 accept
add rule inet {TABLE} input iifname {_GLOB} drop
add rule inet {TABLE} forward iifname . oifname @intra accept
add rule inet {TABLE} forward iifname @nat_ifs oifname != {_GLOB} accept
add rule inet {TABLE} forward oifname @nat_ifs iifname != {_GLOB} ct state established,related accept
add rule inet {TABLE} forward iifname {_GLOB} drop
add rule inet {TABLE} forward oifname {_GLOB} drop
add rule inet {TABLE} postrouting meta nfproto ipv4 ip saddr @nat_nets oifname != {_GLOB} masquerade
"""


def _nft(script: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``nft -f -`` with ``script`` (a transaction: all of it or nothing), or ``nft ARGS``."""
    exe = shutil.which("nft")
    if exe is None:
        raise ExecError("nft is not installed on this host", hint="apt-get install nftables")
    argv = [exe, *args] if script is None else [exe, "-f", "-"]
    return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30, check=False)


def _nft_or_raise(script: str, what: str) -> None:
    proc = _nft(script)
    if proc.returncode != 0:
        raise ExecError(f"nftables refused to {what}: {_last_line(proc.stderr)}",
                        hint=f"see 'nft list table inet {TABLE}'")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.lstrip().startswith("^")]
    return lines[0].strip() if lines else "no message"


def _listing(what: str) -> dict[str, Any] | None:
    """``nft -j list WHAT`` as JSON, or None when it doesn't exist."""
    proc = _nft(None, "-j", "list", *what.split())
    if proc.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def ensure_table() -> None:
    proc = _nft(_RULES)
    if proc.returncode == 0:
        return
    listing = _nft(None, "list", "table", "inet", TABLE)  # (nft 1.0.6's JSON leaves the table's comment out)
    if listing.returncode != 0:
        raise ExecError(f"could not create nftables table inet {TABLE}: {_last_line(proc.stderr)}",
                        hint="is nf_tables available in this kernel? try 'nft list ruleset'")
    if f'comment "{LAYOUT}"' not in listing.stdout:
        raise ExecError(f"nftables table inet {TABLE} exists with other rules than this vmorch's",
                        hint=f"remove every vmorch network on this host, then 'nft delete table inet {TABLE}'")


def admit_bridge(bridge: str) -> None:
    """Let frames between ports of ``bridge`` pass (and nothing else from or to it)."""
    ensure_table()
    _nft_or_raise(f'add element inet {TABLE} intra {{ "{bridge}" . "{bridge}" }}\n', f"admit {bridge}")


def allow_nat(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    ensure_table()
    wanted = {("nat_ifs", f'"{bridge}"'), ("nat_nets", str(subnet))}
    found = set(_elements_of(bridge, ("nat_ifs", "nat_nets")))
    if found == wanted:
        return
    # one transaction: a network whose subnet changes is never without NAT for a moment
    script = "".join(f"delete element inet {TABLE} {set_name} {{ {element} }}\n"
                     for set_name, element in sorted(found - wanted))
    script += f'add element inet {TABLE} nat_ifs {{ "{bridge}" }}\n'
    script += f'add element inet {TABLE} nat_nets {{ {subnet} comment "{bridge}" }}\n'
    _nft_or_raise(script, f"masquerade {subnet} of {bridge}")


def forget_nat(bridge: str) -> None:
    _delete_elements(bridge, ("nat_ifs", "nat_nets"))


def forget_bridge(bridge: str) -> None:
    _delete_elements(bridge, ("intra", "nat_ifs", "nat_nets"))


def elements_of(bridge: str) -> list[str]:
    """The set elements that belong to ``bridge``, as nft would write them (for checks and tests)."""
    return [f"{set_name} {element}" for set_name, element in _elements_of(bridge, ("intra", "nat_ifs", "nat_nets"))]


def _elements_of(bridge: str, sets: tuple[str, ...]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for set_name in sets:
        listing = _listing(f"set inet {TABLE} {set_name}")
        if listing is None:
            continue
        for obj in listing["nftables"]:
            for item in obj.get("set", {}).get("elem", []):
                element = _element_text(item, bridge)
                if element is not None:
                    found.append((set_name, element))
    return found


def _element_text(item: Any, bridge: str) -> str | None:
    """How to name ``item`` in ``delete element``, if it belongs to ``bridge``."""
    if isinstance(item, str):
        return f'"{item}"' if item == bridge else None
    if "concat" in item:
        return f'"{bridge}" . "{bridge}"' if item["concat"] == [bridge, bridge] else None
    inner = item.get("elem", {})
    if inner.get("comment") != bridge:
        return None
    prefix = inner["val"]["prefix"] if isinstance(inner.get("val"), dict) else None
    return f"{prefix['addr']}/{prefix['len']}" if prefix else None


def _delete_elements(bridge: str, sets: tuple[str, ...]) -> None:
    found = _elements_of(bridge, sets)
    if not found:
        return
    script = "".join(f"delete element inet {TABLE} {set_name} {{ {element} }}\n" for set_name, element in found)
    proc = _nft(script)
    # hosts sharing this network namespace share the bridge: another may have removed them first
    if proc.returncode != 0 and _elements_of(bridge, sets):
        raise ExecError(f"nftables refused to remove {bridge}'s elements: {_last_line(proc.stderr)}",
                        hint=f"see 'nft list table inet {TABLE}'")
