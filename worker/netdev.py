"""The host's kernel side of vmorch networks, as one API (issue 19).

On each host, a network is a Linux bridge (``vmbr<vni>``) and a VXLAN device (``vmvx<vni>``, VNI =
the network's, UDP port 4789) enslaved to it, with head-end replication to the other hosts of the
network over their underlay addresses (``netsegment``). One host of the network, its gateway, also
has the subnet's first address on the bridge, a DHCP-only dnsmasq and optionally NAT
(``netgateway``). One nftables table, ``inet vmorch``, keeps networks apart from each other and
from the host (``netfilter``). A VM's port can be shaped and captured (``netshape``).

Everything acts on the network namespace of the caller. Nothing here knows Redis or libvirt.
Order: ``ensure_segment`` before ``set_peers`` and ``gateway_up``; ``gateway_down`` before
``remove_segment`` (the segment doesn't know where the gateway's state directory is).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are; at run time they are loaded on first use (below)
    from .netgateway import gateway_down, gateway_up, leases
    from .netsegment import (
        VXLAN_OVERHEAD,
        VXLAN_PORT,
        Segment,
        bridge_name,
        ensure_segment,
        remove_segment,
        segments,
        set_peers,
        tap_name,
        vxlan_name,
    )
    from .netshape import capture, shape, shaping_support

#: each name and the module that has it. Loaded on first use: pyroute2 costs ~0.2 s of import, which
#: every worker would pay at start (the host's heartbeat is due), most of them never using a network.
_WHERE = {
    **dict.fromkeys(("gateway_down", "gateway_up", "leases"), "netgateway"),
    **dict.fromkeys(("VXLAN_OVERHEAD", "VXLAN_PORT", "Segment", "bridge_name", "ensure_segment", "remove_segment",
                     "segments", "set_peers", "tap_name", "vxlan_name"), "netsegment"),
    **dict.fromkeys(("capture", "shape", "shaping_support"), "netshape"),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__package__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once
    return value


__all__ = ["VXLAN_OVERHEAD", "VXLAN_PORT", "Segment", "bridge_name", "capture", "ensure_segment", "gateway_down",
           "gateway_up", "leases", "remove_segment", "segments", "set_peers", "shape", "shaping_support", "tap_name",
           "vxlan_name"]
