"""The registry takes libvirt's word for the VMs of this host: at worker start, and ever after.

While the worker was away, VMs may have been powered off (``vmorch down`` stops QEMU),
crashed, or been destroyed behind vmorch's back; while it runs, someone with ``virsh`` may
destroy, undefine, resize or snapshot a domain, or its QEMU process may die. ``reconcile``
repairs every VM once before the host announces itself; ``repair`` is the one correction, also
used by ``worker.sync`` on libvirt's lifecycle events and on its periodic pass.

A correction runs under the VM's lock and re-reads both sides under it; a VM with unfinished
jobs is left to them (each records the state it leaves). Each correction is one fenced write
that the VM's history records, with who made it and a ``note`` saying what changed and why.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import libvirt

from orchestrator.control import locks
from orchestrator.control.locks import vm_lock
from orchestrator.model.errors import LockTimeout, NotFound, VmorchError
from orchestrator.model.records import Vm, VmState

from .libvirtconn import DomainStatus
from .runner import Worker

log = logging.getLogger(__name__)

#: why a domain is in its state, from libvirt's reason code: (state, reason) -> what happened
_WHY = {
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN): "stopped outside vmorch",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN): "shut down by its guest or outside vmorch",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED): "destroyed outside vmorch",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED): "its QEMU process died (killed, or crashed)",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_FAILED): "its QEMU process failed",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED): "migrated away outside vmorch",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SAVED): "saved outside vmorch",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT): "reverted to a snapshot outside vmorch",
    (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DAEMON): "stopped when libvirt shut down",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED): "started outside vmorch",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED): "resumed outside vmorch",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_RESTORED): "restored outside vmorch",
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_FROM_SNAPSHOT): "reverted to a snapshot outside vmorch",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER): "paused outside vmorch",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR): "paused by a disk I/O error",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_CRASHED): "its guest panicked",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT): "a snapshot is being taken outside vmorch",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_SAVE): "being saved outside vmorch",
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION): "being migrated outside vmorch",
}


def drift(vm: Vm, actual: DomainStatus) -> dict[str, Any]:
    """The record's fields that libvirt disagrees with, as libvirt has them.

    A domain libvirt no longer has changes only the state (``missing``): its memory and vCPUs
    stay what vmorch reserved for it until it is deleted. libvirt's ``unknown`` is no news.
    """
    if actual.state is VmState.MISSING:
        return {} if vm.state is VmState.MISSING else {"state": VmState.MISSING.value}
    out: dict[str, Any] = {}
    # A domain that went off with libvirt's reason "crashed" (its QEMU process was gone, e.g. a kill
    # interrupted by a worker crash) is as off as a shut-off one: a job that recorded it shut off
    # stands. A VM recorded running that crashed is news, and is recorded.
    off_either_way = vm.state is VmState.SHUTOFF and actual.state is VmState.CRASHED
    if actual.state is not vm.state and actual.state is not VmState.UNKNOWN and not off_either_way:
        out["state"] = actual.state.value
    if actual.memory_mib != vm.memory_mib:
        out["memory_mib"] = actual.memory_mib
    if actual.vcpus != vm.vcpus:
        out["vcpus"] = actual.vcpus
    if sorted(actual.snapshots) != sorted(vm.snapshots):
        out["snapshots"] = sorted(actual.snapshots)
    return out


def _why(w: Worker, domain: str, state: VmState) -> str:
    if state is VmState.MISSING:
        return "undefined outside vmorch"
    with contextlib.suppress(libvirt.libvirtError, VmorchError):
        code, reason = w.driver.conn.lookupByName(domain).state()
        return _WHY.get((code, reason), "changed outside vmorch")
    return "changed outside vmorch"


def describe(w: Worker, vm: Vm, changes: dict[str, Any]) -> str:
    """What changed, as the history and ``vm show`` say it: "was running, now shutoff (destroyed outside vmorch)"."""
    parts = []
    if "state" in changes:
        parts.append(f"was {vm.state.value}, now {changes['state']} ({_why(w, vm.domain, VmState(changes['state']))})")
    if "memory_mib" in changes:
        parts.append(f"memory {vm.memory_mib} -> {changes['memory_mib']} MiB")
    if "vcpus" in changes:
        parts.append(f"vcpus {vm.vcpus} -> {changes['vcpus']}")
    if "snapshots" in changes:
        gone, new = set(vm.snapshots) - set(changes["snapshots"]), set(changes["snapshots"]) - set(vm.snapshots)
        parts.append("snapshots " + ", ".join([*(f"+{s}" for s in sorted(new)), *(f"-{s}" for s in sorted(gone))]))
    return "; ".join(parts)


class Busy(Exception):
    """A job holds the VM's lock or has one queued: it records the state it leaves; look again later."""


def repair(w: Worker, namespace: str, name: str, *, by: str, timeout: float,
           prefix: str = "corrected from libvirt") -> tuple[Vm, dict[str, Any]] | None:
    """Bring one VM's record in line with libvirt, under its lock; returns (the VM as it was, the changes).

    None: nothing to repair here -- the VM is gone or on another host now, or libvirt did not
    answer. Raises ``Busy`` when a job holds the VM or waits for it.
    """
    lock = vm_lock(namespace, name)
    try:
        with w.locks.hold(lock, timeout=timeout) as holding:
            locks.require(lock)  # LOCK: vm -- no job changes the VM between these reads and the update below
            if w.store.mailbox(namespace, name):
                raise Busy(f"{namespace}/{name} has unfinished jobs")
            try:
                vm = w.store.get_vm(namespace, name, as_stored=True)
            except NotFound:
                return None
            if vm.host != w.host:  # moved away since the event
                return None
            try:
                actual = w.driver.status(vm.domain)
            except VmorchError as exc:
                log.warning("cannot read %s from libvirt: %s", vm.domain, exc)
                return None
            changes = drift(vm, actual)
            if not changes:
                return vm, {}
            what = describe(w, vm, changes)
            holding.check()
            if not w.store.update_vm(namespace, name, holding.fence(lock), {**changes, "note": f"{prefix}: {what}"},
                                     by=by):
                return None
    except LockTimeout as exc:
        raise Busy(f"{namespace}/{name} is locked by a job") from exc
    log.warning("%s/%s %s (%s): %s", namespace, name, prefix, by, what)
    return vm, changes


def reconcile(w: Worker) -> dict[str, tuple[str, str]]:
    """Repair the state of this host's VMs; returns {"ns/name": (was, now)} for each repair of the state."""
    repaired: dict[str, tuple[str, str]] = {}
    for namespace, name in w.store.vms_on_host(w.host):
        if w.store.mailbox(namespace, name):
            continue
        try:
            done = repair(w, namespace, name, by=f"reconcile@{w.name}", timeout=w.settings.lock_expire + 2,
                          prefix="reconciled at worker start")
        except Busy:
            continue
        if done and "state" in done[1]:
            repaired[f"{namespace}/{name}"] = (done[0].state.value, done[1]["state"])
    for vm_name, (was, now) in sorted(repaired.items()):
        log.info("reconciled %s: registry said %s, libvirt says %s", vm_name, was, now)
    return repaired
