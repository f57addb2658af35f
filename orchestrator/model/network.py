"""Networks: named L2 segments of one namespace that span its hosts, and a VM's NICs on them.

A network is a Linux bridge on each host that has a VM on it, joined across hosts by VXLAN
(one VNI per network, allocated in Redis). One host, its *gateway host*, also holds the
network's first address, its DHCP server and, with ``nat``, its way out. Users name networks,
subnets and NIC numbers only: the devices behind them are the worker's business
(``worker.netdev``), derived from the VNI and the VM's domain.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.model.errors import InvalidInput
from orchestrator.model.names import HostName, Name, check_name

#: a subnet's prefix: /16 leaves the VNI's broadcast domain at a sane size; /29 leaves 5 guests
PREFIX_MIN, PREFIX_MAX = 16, 29
#: NICs per VM (a tap's name carries the index as one digit)
NICS_MAX = 8
VNI_MIN, VNI_MAX = 4096, 2**24 - 1
NetState = Literal["creating", "ready", "deleting"]
SUBNET_HINT = "give a private IPv4 network such as 10.10.0.0/24 (prefix /16 to /29, host bits zero)"
_SHAPE_HINT = "write --delay 20ms, --loss 1%, --rate 10mbit (0 clears one)"


def check_net_name(value: str) -> str:
    return check_name(value, "network name")


def check_subnet(value: str) -> str:
    """A network's subnet, normalised (``10.10.0.0/24``); refused with a reason and a hint."""
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise InvalidInput(f"subnet: {value[:60]!r} is not an IPv4 network ({exc})", hint=SUBNET_HINT) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidInput(f"subnet: {net} is IPv6; vmorch networks are IPv4", hint=SUBNET_HINT)
    if not PREFIX_MIN <= net.prefixlen <= PREFIX_MAX:
        raise InvalidInput(f"subnet: /{net.prefixlen} is outside /{PREFIX_MIN} to /{PREFIX_MAX}", hint=SUBNET_HINT)
    if net.is_loopback or net.is_link_local or net.is_multicast or net.is_reserved or net.is_unspecified:
        raise InvalidInput(f"subnet: {net} is a special-purpose range (loopback, link-local, multicast or reserved)",
                           hint=SUBNET_HINT)
    return str(net)


def subnets_overlap(a: str, b: str) -> bool:
    return ipaddress.ip_network(a).overlaps(ipaddress.ip_network(b))


def gateway_address(subnet: str) -> str:
    """The gateway's address: the subnet's first host address (dnsmasq and NAT answer there)."""
    return str(next(ipaddress.ip_network(subnet).hosts()))


def nic_mac(namespace: str, vm: str, index: int) -> str:
    """A NIC's MAC: stable for a VM's name (a relaunch keeps it), locally administered (52:54:00 is
    QEMU's own prefix, which guests and tools already treat as virtual)."""
    digest = hashlib.sha256(f"{namespace}/{vm}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class NetworkSpec(BaseModel):
    """What ``vmorch net create`` asks for."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    name: Name
    subnet: str = Field(max_length=64)
    #: a DHCP server on the gateway host hands out the subnet's addresses
    dhcp: bool = True
    #: guests reach outside addresses, masqueraded through the gateway host
    nat: bool = False
    #: the gateway host (None: the up host with the fewest gateways)
    host: HostName | None = None

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        try:
            return check_subnet(value)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None

    @property
    def needs_gateway(self) -> bool:
        return self.dhcp or self.nat


class Network(BaseModel):
    """A network's record (``vmorch net show``)."""

    model_config = ConfigDict(frozen=True, defer_build=True)
    namespace: str
    name: str
    subnet: str
    vni: int
    dhcp: bool
    nat: bool
    state: NetState
    #: the host with the gateway address, DHCP and NAT; "" for a network with neither DHCP nor NAT
    gateway_host: str = ""
    gateway: str = ""
    created_at: float | None = None
    by: str = ""
    #: the hosts where its bridge is up now, with their underlay addresses
    hosts: dict[str, str] = {}
    #: MAC -> address, as the gateway's DHCP server leased them
    leases: dict[str, str] = {}
    #: why it is not ready yet (the gateway host's last error)
    error: str = ""
    #: deleted once this job is final and no VM is on it (an experiment's teardown)
    delete_after: int | None = None

    @classmethod
    def from_hash(cls, namespace: str, h: dict[str, str], hosts: dict[str, str]) -> Network:
        return cls(namespace=namespace, name=h["name"], subnet=h["subnet"], vni=int(h["vni"]),
                   dhcp=h.get("dhcp") == "1", nat=h.get("nat") == "1", state=h.get("state", "creating"),  # type: ignore[arg-type]
                   gateway_host=h.get("gateway_host", ""), gateway=h.get("gateway", ""),
                   created_at=float(h["created_at"]) if h.get("created_at") else None, by=h.get("by", ""),
                   hosts=hosts, leases=json.loads(h.get("leases") or "{}"), error=h.get("error", ""),
                   delete_after=int(h["delete_after"]) if h.get("delete_after") else None)


class Shaping(BaseModel):
    """Link emulation on one NIC (towards the guest): ``vm set --nic N --delay --loss --rate``."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    delay_ms: float | None = Field(default=None, ge=0, le=60_000)
    loss_pct: float | None = Field(default=None, ge=0, le=100)
    rate_kbit: int | None = Field(default=None, ge=0, le=100_000_000)

    def merged(self, newer: Shaping) -> Shaping:
        """This shaping with ``newer``'s given values on top; a 0 clears that one."""
        out = self.model_dump()
        for field, value in newer.model_dump(exclude_none=True).items():
            out[field] = value or None
        return Shaping(**out)

    @property
    def empty(self) -> bool:
        return self.delay_ms is None and self.loss_pct is None and self.rate_kbit is None

    def describe(self) -> str:
        parts = []
        if self.delay_ms is not None:
            parts.append(f"delay {self.delay_ms:g}ms")
        if self.loss_pct is not None:
            parts.append(f"loss {self.loss_pct:g}%")
        if self.rate_kbit is not None:
            parts.append(f"rate {self.rate_kbit}kbit")
        return ", ".join(parts) or "none"


class Nic(BaseModel):
    """One NIC of a VM, as its record keeps it."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    net: str
    mac: str
    shaping: Shaping = Shaping()
    #: its guest's address, as ``vm show`` found it (agent, else DHCP lease); not stored
    ip: str | None = None


def nics_for(namespace: str, vm: str, nets: list[str]) -> list[Nic]:
    return [Nic(net=net, mac=nic_mac(namespace, vm, i)) for i, net in enumerate(nets)]


def parse_nics(value: Any) -> list[Nic]:
    """A VM record's ``nics`` (JSON text in the hash, a list once read)."""
    if value in (None, ""):
        return []
    data = json.loads(value) if isinstance(value, str | bytes) else value
    return [n if isinstance(n, Nic) else Nic.model_validate(n) for n in data]


_DURATION = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>us|ms|s)?")
_RATE = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?", re.I)
_RATE_KBIT = {"bit": 0.001, "kbit": 1, "mbit": 1000, "gbit": 1_000_000,
              "bps": 0.008, "kbps": 8, "mbps": 8000, "gbps": 8_000_000}


def parse_delay(text: str) -> float:
    """``20ms``, ``0.5s``, ``300us`` (or a bare number of ms) -> milliseconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise InvalidInput(f"delay: {text[:40]!r} is not a duration", hint=_SHAPE_HINT)
    n = float(m["n"])
    return {"us": n / 1000, "s": n * 1000}.get(m["unit"] or "ms", n)


def parse_loss(text: str) -> float:
    """``1%`` or ``1`` -> percent."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise InvalidInput(f"loss: {text[:40]!r} is not a percentage", hint=_SHAPE_HINT) from None
    if not 0 <= value <= 100:
        raise InvalidInput(f"loss: {value:g}% is not between 0% and 100%", hint=_SHAPE_HINT)
    return value


def parse_rate(text: str) -> int:
    """``10mbit``, ``512kbit``, ``1gbit`` (tc's units; ``Xbps`` are bytes) -> kbit/s."""
    m = _RATE.fullmatch(text.strip())
    if not m:
        raise InvalidInput(f"rate: {text[:40]!r} is not a rate", hint=_SHAPE_HINT)
    kbit = float(m["n"]) * _RATE_KBIT[(m["unit"] or "kbit").lower()]
    if kbit and kbit < 8:
        raise InvalidInput(f"rate: {text!r} is below 8kbit", hint=_SHAPE_HINT)
    return round(kbit)
