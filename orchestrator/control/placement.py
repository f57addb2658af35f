"""Placement: which host a new VM goes to. A pure decision over host records.

After minimega's scheduler: among hosts that are up (not down, not draining), in the
namespace's host set, matching the requested labels and whose libvirt answered the
worker's last probe, and that have room for the VM, the one with the smallest share of its
memory committed (then the smallest share of its vCPUs, then the name), counting the VMs
placed earlier in the same request; so equal VMs spread evenly over equal hosts, and a
bigger host takes proportionally more. Or
the host of another VM (``--colocate``); or round the hosts for a range (``--spread``).
A VM made from a catalog image only goes where that image is ready. Every refusal names the
resource that ran out (or the hosts that lack the image). A worker that is up while its libvirtd is
not would fail every launch sent to it, so such a host gets none, pinned or not. The
caller holds the ``cmd`` lock of the namespace and the lock of every candidate host while
it decides and reserves, so two decisions never race for the same free memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.model.errors import InvalidInput, NoCapacity
from orchestrator.model.records import Host, HostState

GIB = 1024**3


@dataclass(frozen=True)
class Request:
    vm: str
    memory_mib: int
    vcpus: int
    host: str | None = None
    host_labels: Mapping[str, str] = field(default_factory=dict)
    colocate_host: str | None = None  # the host of the VM to colocate with, resolved by the caller
    #: a catalog image the VM's disk is made from, and the hosts where it is ready (None: no image)
    image: str | None = None
    image_hosts: frozenset[str] | None = None
    #: the disk made for it (GiB): it needs that much room, plus a margin, in the host's store
    disk_gib: int = 0


@dataclass(frozen=True)
class Limits:
    """How far a host may be committed beyond its size (as Nova's allocation ratios)."""

    memory_ratio: float = 1.0
    cpu_ratio: float = 8.0
    #: room a disk leaves free in the host's store beyond its full size (GiB)
    disk_margin_gib: float = 1.0


@dataclass
class _Room:
    host: Host
    memory_mib: int
    vcpus: int
    #: what may be committed in all (size x allocation ratio)
    memory_cap: int = 0
    vcpus_cap: int = 0
    #: free bytes in its store, less the disks placed there in this request (None: not reported)
    store_free: int | None = None
    margin_gib: float = 1.0

    def fits(self, r: Request) -> bool:
        return self.memory_mib >= r.memory_mib and self.vcpus >= r.vcpus and self.disk_fits(r)

    def disk_fits(self, r: Request) -> bool:
        return (not r.disk_gib or self.store_free is None
                or self.store_free >= (r.disk_gib + self.margin_gib) * GIB)

    def load(self) -> tuple[float, float, str]:
        """How full the host is, as shares of what it may take: the least loaded gets the next VM."""
        return (1 - self.memory_mib / self.memory_cap if self.memory_cap > 0 else 1.0,
                1 - self.vcpus / self.vcpus_cap if self.vcpus_cap > 0 else 1.0, self.host.name)


def plan(requests: Sequence[Request], hosts: Sequence[Host], *, allowed: set[str] | None = None,
         spread: bool = False, limits: Limits = Limits()) -> dict[str, str]:
    """Return {vm: host} for every request, or raise naming what is missing. Reserves as it goes."""
    by_name = {h.name: h for h in hosts}
    rooms = {}
    for h in hosts:
        memory_cap, vcpus_cap = int(h.memory_mib * limits.memory_ratio), int(h.cpus * limits.cpu_ratio)
        rooms[h.name] = _Room(h, memory_cap - h.committed_mib, vcpus_cap - h.committed_vcpus, memory_cap, vcpus_cap,
                              h.store_free_bytes, limits.disk_margin_gib)
    placement: dict[str, str] = {}
    turn = 0
    for r in requests:
        pinned = r.host or r.colocate_host
        if pinned is not None:
            room = rooms.get(pinned)
            if room is None:
                known = ", ".join(sorted(by_name)) or "none registered"
                raise InvalidInput(f"unknown host {pinned!r}", hint=f"known hosts: {known}")
            _check_usable(room.host, allowed)
            _check_image(r, room.host.name)
            if not room.fits(r):
                raise _no_room(r, [room])
            chosen = room
        else:
            candidates = _candidates(r, rooms.values(), allowed)
            fitting = [room for room in candidates if room.fits(r)]
            if not fitting:
                raise _no_room(r, candidates)
            if spread:
                ordered = sorted(fitting, key=lambda room: room.host.name)
                chosen = ordered[turn % len(ordered)]
                turn += 1
            else:
                chosen = min(fitting, key=_Room.load)
        chosen.memory_mib -= r.memory_mib
        chosen.vcpus -= r.vcpus
        if chosen.store_free is not None:
            chosen.store_free -= r.disk_gib * GIB
        placement[r.vm] = chosen.host.name
    return placement


def _check_usable(host: Host, allowed: set[str] | None) -> None:
    if host.state is not HostState.UP:
        raise InvalidInput(f"host {host.name!r} is {host.state.value}",
                           hint="pick a host that is up and not draining (see 'vmorch host list')")
    if allowed is not None and host.name not in allowed:
        raise InvalidInput(f"host {host.name!r} is not in this namespace's hosts ({', '.join(sorted(allowed))})",
                           hint="pick one of them, or change the namespace with 'vmorch ns create --hosts'")
    if host.libvirt_ok is False:
        raise InvalidInput(f"host {host.name!r} can't reach its libvirt: {host.libvirt_error or 'no answer'}",
                           hint="see 'vmorch doctor'; or pick another host")


def _check_image(r: Request, host: str) -> None:
    if r.image_hosts is not None and host not in r.image_hosts:
        ready = ", ".join(sorted(r.image_hosts)) or "no host"
        raise InvalidInput(f"image {r.image!r} is not ready on host {host!r} (it is ready on {ready})",
                           hint=f"pick another host, or have an admin import it there ('vmorch image import "
                                f"{r.image} SOURCE --host {host}')")


def _candidates(r: Request, rooms: Iterable[_Room], allowed: set[str] | None) -> list[_Room]:
    up = [room for room in rooms if room.host.state is HostState.UP]
    if not up:
        raise NoCapacity("no host is up and accepting VMs",
                         hint="start a worker ('vmorch up', or 'vmorch worker --host NAME'), or undrain a host")
    if allowed is not None:
        up = [room for room in up if room.host.name in allowed]
        if not up:
            raise NoCapacity(f"none of this namespace's hosts ({', '.join(sorted(allowed))}) is up",
                             hint="start their workers, or widen the namespace's hosts")
    if r.host_labels:
        up = [room for room in up if all(room.host.labels.get(k) == v for k, v in r.host_labels.items())]
        if not up:
            wanted = ",".join(f"{k}={v}" for k, v in sorted(r.host_labels.items()))
            raise NoCapacity(f"no up host has the labels {wanted}",
                             hint="see the hosts' labels with 'vmorch host list'")
    if r.image_hosts is not None:
        lacking = sorted(room.host.name for room in up if room.host.name not in r.image_hosts)
        up = [room for room in up if room.host.name in r.image_hosts]
        if not up:
            raise NoCapacity(f"image {r.image!r} is not ready on any host {r.vm!r} may use: {', '.join(lacking)} "
                             f"lack it", hint=f"see 'vmorch image show {r.image}'; an admin imports it with "
                                              f"'vmorch image import {r.image} SOURCE --host HOST'")
    # None: a worker older than the probe, or not probed yet; only a probe that failed rules a host out
    answering = [room for room in up if room.host.libvirt_ok is not False]
    if not answering:
        why = "; ".join(f"{room.host.name}: {room.host.libvirt_error or 'no answer'}" for room in up)
        raise NoCapacity(f"no host that is up can reach its libvirt ({why})",
                         hint="see 'vmorch doctor' for what to restart")
    return answering


def no_store_room(host: str, free_bytes: int, disk_gib: int, margin_gib: float) -> str:
    """The one wording of a store without room for a disk (placement's refusal, the worker's error)."""
    return (f"host {host} has {max(free_bytes, 0) / GIB:.1f} GiB free in its store; the disk needs "
            f"{disk_gib} GiB + {margin_gib:g} GiB")


def _no_room(r: Request, rooms: Sequence[_Room]) -> NoCapacity:
    fit_otherwise = [room for room in rooms if room.memory_mib >= r.memory_mib and room.vcpus >= r.vcpus]
    if fit_otherwise and not any(room.disk_fits(r) for room in fit_otherwise):
        most = max(fit_otherwise, key=lambda room: room.store_free or 0)
        return NoCapacity(no_store_room(most.host.name, most.store_free or 0, r.disk_gib, most.margin_gib),
                          hint="ask for a smaller disk (--disk), free space in the host's store, or add a host")
    most_memory = max((room.memory_mib for room in rooms), default=0)
    most_vcpus = max((room.vcpus for room in rooms), default=0)
    if most_memory < r.memory_mib:
        return NoCapacity(f"not enough memory for {r.vm!r}: it needs {r.memory_mib} MiB, the most free on one "
                          f"host is {max(most_memory, 0)} MiB", hint="ask for less memory, delete VMs, or add a host")
    if most_vcpus < r.vcpus:
        return NoCapacity(f"not enough vCPUs for {r.vm!r}: it needs {r.vcpus}, the most free on one host is "
                          f"{max(most_vcpus, 0)}", hint="ask for fewer vCPUs, delete VMs, or add a host")
    return NoCapacity(f"no single host has both {r.memory_mib} MiB and {r.vcpus} vCPUs free for {r.vm!r}",
                      hint="ask for less, delete VMs, or add a host")

