"""What the driver's operations (and the handlers) return: frozen, typed results.

A job's ``result``, as users see it (``vmorch job show --json``), is ``to_json()``: ``state``,
``changed``, the fields of the kind of result, then ``note`` if there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from orchestrator.model.records import VmState


@dataclass(frozen=True)
class DriverResult:
    """What an operation left: the domain's state, whether it changed anything, and why not."""

    state: VmState
    changed: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state.value, "changed": self.changed}
        for f in fields(self):
            if f.name not in ("state", "changed", "note"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) \
                    else value
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True, kw_only=True)
class Launched(DriverResult):
    domain: str
    #: the disk vmorch created for it, if any
    disk: str | None


@dataclass(frozen=True, kw_only=True)
class Deleted(DriverResult):
    disks_removed: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Resized(DriverResult):
    #: as the persistent definition has them now
    memory_mib: int
    vcpus: int
    #: whether the running VM has them too (read back from libvirt)
    live: bool
    #: what the running VM has, read back from libvirt (None: not running)
    memory_mib_live: int | None = None
    vcpus_live: int | None = None


@dataclass(frozen=True, kw_only=True)
class Snapshotted(DriverResult):
    snapshot: str


@dataclass(frozen=True, kw_only=True)
class Reverted(DriverResult):
    snapshot: str
    #: the definition of the snapshot's time
    memory_mib: int
    vcpus: int
    #: what the running VM has where it differs from that definition, read back from libvirt (a
    #: snapshot taken while a change waited for the next boot); None: the same, or not running
    memory_mib_live: int | None = None
    vcpus_live: int | None = None


@dataclass(frozen=True, kw_only=True)
class Imported(DriverResult):
    #: where its disk is on this host
    disk: str | None


@dataclass(frozen=True, kw_only=True)
class Tagged(DriverResult):
    tags: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class HandedOver(DriverResult):
    #: the size of what went through Redis (definition and disk)
    bytes: int


@dataclass(frozen=True, kw_only=True)
class Shaped(DriverResult):
    nic: int
    #: the NIC's link emulation now (delay_ms, loss_pct, rate_kbit; null: none)
    shaping: dict[str, Any]
    #: whether the running VM's NIC has it now (else: from its next start)
    live: bool
