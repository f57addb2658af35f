"""Execution records stored beside operations: jobs, VMs and hosts as users see them.

Records are read from Redis hashes (all values strings) and rendered as the JSON of the
user-facing contract. Timestamps are kept in Redis as epoch seconds taken from Redis's
own clock (``TIME`` inside the scripts), so every host agrees on one clock.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_serializer, field_validator

from orchestrator.model.network import Nic
from orchestrator.model.operation import Op


class JobState(StrEnum):
    QUEUED = "queued"
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})


class BulkOp(StrEnum):
    """The op of a parent job: it runs nothing itself, its children do."""

    BULK = "bulk"


class ImageOp(StrEnum):
    """The op of an image job (``vmorch image import|remove``): one host's image store, outside any VM's order."""

    IMPORT = "image-import"
    REMOVE = "image-remove"


def _job_op(value: str) -> Op | BulkOp | ImageOp:
    if value == BulkOp.BULK:
        return BulkOp.BULK
    if value in _IMAGE_OPS:
        return ImageOp(value)
    return Op(value)


_IMAGE_OPS = frozenset(o.value for o in ImageOp)


class VmState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    MISSING = "missing"  # vmorch knows it, libvirt doesn't (yet, or any more)
    UNKNOWN = "unknown"  # its host is down


class HostState(StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"


def ts(value: str | None) -> datetime | None:
    if value in (None, ""):
        return None
    return datetime.fromtimestamp(float(value), tz=UTC)


class _Record(BaseModel):
    # Each record's validator is built when first used, not at import: a CLI command uses one
    # or two of them; building all of them at import cost every command 0.02-0.06 s.
    model_config = ConfigDict(frozen=True, defer_build=True)

    @field_serializer("*", when_used="json")
    def _iso(self, value: Any) -> Any:
        if isinstance(value, datetime):
            return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return value


class JobError(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)
    code: str
    message: str
    #: what the user can do about it, when vmorch knows
    hint: str | None = None


class Job(_Record):
    id: int
    op: Op | BulkOp | ImageOp
    namespace: str
    vm: str
    host: str
    state: JobState
    seq: int
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    error: JobError | None
    result: dict[str, Any] | None
    params: dict[str, Any]
    #: who asked to cancel this job while it was running (it stops at its next step)
    cancel_requested_by: str | None = None
    #: the parent job of a bulk command's child
    parent: int | None = None
    #: a parent's children by state: total, pending (not final yet), succeeded, failed, canceled
    children: dict[str, int] | None = None
    #: the jobs this one waits for (``--after``); it is held out of its VM's order until they are met
    after: list[int] = []
    #: the job this one re-runs (``job retry``)
    retry_of: int | None = None
    #: a delayed job (an experiment step's ``wait:``) starts at this time, once its dependencies are met
    not_before: datetime | None = None

    @property
    def is_parent(self) -> bool:
        return self.op is BulkOp.BULK

    @property
    def held(self) -> bool:
        """Queued, but waiting for its dependencies (it has no place in its VM's order yet)."""
        return self.state is JobState.QUEUED and self.seq == 0 and not self.is_parent

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        children = None
        if h["op"] == BulkOp.BULK:
            n = {k: int(h.get(f"n_{k}") or 0) for k in ("total", "final", "succeeded", "failed", "canceled")}
            children = {"total": n["total"], "pending": n["total"] - n["final"], "succeeded": n["succeeded"],
                        "failed": n["failed"], "canceled": n["canceled"]}
        return cls(
            id=int(h["id"]),
            op=_job_op(h["op"]),
            namespace=h["namespace"],
            vm=h["vm"],
            host=h.get("host", ""),
            state=JobState(h["state"]),
            seq=int(h["seq"]),
            submitted_at=ts(h.get("submitted_at")),
            started_at=ts(h.get("started_at")),
            finished_at=ts(h.get("finished_at")),
            attempts=int(h.get("attempts") or 0),
            error=JobError(**json.loads(h["error"])) if h.get("error") else None,
            result=json.loads(h["result"]) if h.get("result") else None,
            params=json.loads(h.get("params") or "{}"),
            cancel_requested_by=h.get("cancel_requested") or None,
            parent=int(h["parent"]) if h.get("parent") else None,
            children=children,
            after=json.loads(h["after"]) if h.get("after") else [],
            retry_of=int(h["retry_of"]) if h.get("retry_of") else None,
            not_before=ts(h.get("not_before")),
        )


AgentState = Literal["connected", "absent"]


class Address(BaseModel):
    """One address of a guest's network interface."""

    model_config = ConfigDict(frozen=True, defer_build=True)
    ip: str
    mac: str


class SnapshotInfo(_Record):
    name: str
    created_at: datetime | None = None
    #: the guest state (RAM and devices) it saved in the VM's qcow2, 0 if the VM was off; None where no
    #: file holds it (libvirt's test driver) or it could not be read (``worker.disks.qcow2_snapshot_sizes``)
    size_bytes: int | None = None


class Vm(_Record):
    name: str
    namespace: str
    host: str
    state: VmState
    memory_mib: int
    vcpus: int
    #: what the running VM has where it differs from what is set (``memory_mib``, ``vcpus``: the
    #: definition, for the next boot), as the last ``vm set`` read it back; None: the same, or not running
    memory_mib_live: int | None = None
    vcpus_live: int | None = None
    tags: dict[str, str] = {}
    disk_gib: int = 0
    image: str | None = None
    snapshots: list[str] = []
    #: each snapshot's name, when it was taken and its size if known, as its host's worker last wrote them
    snapshot_details: list[SnapshotInfo] = []
    domain: str
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: what the last operation left to say (e.g. "vcpus apply at next boot")
    note: str | None = None
    #: whether its guest agent answers (as its host's worker last saw, every few seconds)
    agent: AgentState = "absent"
    #: the guest's addresses, as its agent reports them (loopback and link-local left out)
    addresses: list[Address] = []
    #: its NICs on vmorch networks, in order (none: one user-mode NIC, outbound only)
    nics: list[Nic] = []

    @field_validator("addresses", mode="before")
    @classmethod
    def _addresses(cls, value: Any) -> Any:
        # stored as JSON text in the record's hash (the Lua reader passes it on as a string)
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("nics", mode="before")
    @classmethod
    def _nics(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def on_down_host(self) -> Vm:
        """As users see it while its host is down: its state is unknown, and so is its agent."""
        return self.model_copy(update={"state": VmState.UNKNOWN, "agent": "absent"})


@cache
def _vm_list() -> TypeAdapter[list[Vm]]:
    return TypeAdapter(list[Vm])


def vms_from_json(text: str | bytes) -> list[Vm]:
    """VM records from the JSON array the store's vms_json script builds (see store/lua/vm_json.lua).

    One call into pydantic's validator for the whole array: listing 10,000 VMs record by record
    in Python cost twice what Redis spends reading them.
    """
    return _vm_list().validate_json(text)


class Host(_Record):
    name: str
    state: HostState
    heartbeat_at: datetime | None
    started_at: datetime | None
    pid: int | None
    libvirt_uri: str
    cpus: int
    memory_mib: int
    #: what placement reserved on this host for vmorch's VMs
    committed_mib: int = 0
    committed_vcpus: int = 0
    vms: int
    labels: dict[str, str] = {}
    hostname: str = ""
    #: how other hosts' libvirtd reach this one for live migration ("" = no live moves here)
    migrate_uri: str = ""
    #: its VM disks are on storage every host sees at the same path
    shared_storage: bool = False
    #: the vmorch version its worker runs
    version: str = ""
    #: the host's clock minus Redis's, measured at its last heartbeat (None: an older worker)
    clock_offset: float | None = None
    #: whether the worker's last libvirt probe worked (None: not probed yet), and why not
    libvirt_ok: bool | None = None
    libvirt_error: str = ""
    #: how its guests run: ``kvm`` or ``tcg`` (software emulation), as its worker found at start, and why
    accel: str = ""
    accel_reason: str = ""
    #: its worker shut down cleanly (a down host that was not stopped has crashed or lost Redis)
    stopped: bool = False
    #: its address on the network between hosts (vmorch networks' VXLAN runs over it; "" = no networks)
    underlay: str = ""
    #: the link emulation its kernel can do for ``vm set --nic``: some of rate, delay, loss
    shaping: str = ""
    #: free bytes in its storage directory, at its last heartbeat (None: an older worker)
    store_free_bytes: int | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str], *, now: float, down_after: float, vms: int) -> Host:
        return cls(
            name=h["name"],
            state=host_state(h, now=now, down_after=down_after),
            heartbeat_at=ts(h.get("heartbeat_at")),
            started_at=ts(h.get("started_at")),
            pid=int(h["pid"]) if h.get("pid") else None,
            libvirt_uri=h.get("libvirt_uri", ""),
            cpus=int(h.get("cpus") or 0),
            memory_mib=int(h.get("memory_mib") or 0),
            committed_mib=int(h.get("committed_mib") or 0),
            committed_vcpus=int(h.get("committed_vcpus") or 0),
            vms=vms,
            labels=json.loads(h.get("labels") or "{}"),
            migrate_uri=h.get("migrate_uri", ""),
            shared_storage=bool(h.get("shared_storage")),
            store_free_bytes=int(h["store_free_bytes"]) if h.get("store_free_bytes") else None,
            hostname=h.get("hostname", ""),
            version=h.get("version", ""),
            clock_offset=float(h["clock_offset"]) if h.get("clock_offset") else None,
            libvirt_ok=None if "libvirt_ok" not in h else bool(h["libvirt_ok"]),
            libvirt_error=h.get("libvirt_error", ""),
            accel=h.get("accel", ""),
            accel_reason=h.get("accel_reason", ""),
            stopped=bool(h.get("stopped")),
            underlay=h.get("underlay", ""),
            shaping=h.get("shaping", ""),
        )


class Event(_Record):
    """One entry of a namespace's history: a job's state change, or a change of a VM record."""

    id: str
    at: datetime | None
    kind: str  # "job" or "vm"
    job: int | None
    vm: str
    op: str
    state: str
    by: str
    detail: str

    @classmethod
    def from_fields(cls, entry_id: str, f: dict[str, str]) -> Event:
        return cls(id=entry_id, at=ts(f.get("at")), kind=f.get("kind", ""),
                   job=int(f["job"]) if f.get("job") else None, vm=f.get("vm", ""), op=f.get("op", ""),
                   state=f.get("state", ""), by=f.get("by", ""), detail=f.get("detail", ""))


#: a namespace quota's limits, each stored as the namespace hash's field ``quota_<name>``
QUOTA_FIELDS = ("vms", "memory_mib", "vcpus", "disk_gib")


class Quota(BaseModel):
    """A namespace's limits: None (or 0 when setting one) = no limit. Checked atomically at acceptance."""
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    vms: int | None = Field(default=None, ge=0, le=10**9)
    memory_mib: int | None = Field(default=None, ge=0, le=10**12)
    vcpus: int | None = Field(default=None, ge=0, le=10**9)
    disk_gib: int | None = Field(default=None, ge=0, le=10**12)

    def cleared(self) -> Quota:
        """The same limits, with 0 meaning none."""
        return Quota(**{f: getattr(self, f) or None for f in QUOTA_FIELDS})

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Quota:
        return cls(**{f: int(h[f"quota_{f}"]) for f in QUOTA_FIELDS if h.get(f"quota_{f}")})


class Namespace(_Record):
    name: str
    #: the hosts its VMs may be placed on; None = every host
    hosts: list[str] | None
    state: str  # "active" or "deleting"
    created_at: datetime | None
    vms: int
    #: its limits (``vmorch ns quota``)
    quota: Quota = Field(default_factory=lambda: Quota())

    @classmethod
    def from_hash(cls, name: str, h: dict[str, str], *, vms: int) -> Namespace:
        return cls(name=name, hosts=json.loads(h["hosts"]) if h.get("hosts") else None,
                   state=h.get("state") or "active", created_at=ts(h.get("created_at")), vms=vms,
                   quota=Quota.from_hash(h))


def host_state(h: dict[str, str], *, now: float, down_after: float) -> HostState:
    """The one place that decides whether a host is up, from its record and Redis's clock."""
    beat = float(h.get("heartbeat_at") or 0)
    if now - beat > down_after or h.get("stopped"):
        return HostState.DOWN
    return HostState.DRAINING if h.get("draining") else HostState.UP


def domain_name(namespace: str, vm: str) -> str:
    """The libvirt domain name of a VM: unique per host across namespaces (names have no dots)."""
    return f"{namespace}.{vm}"
