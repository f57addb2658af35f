"""On start, a worker takes libvirt's word for the state of its host's VMs.

While the worker was away, VMs may have been powered off (``vmorch down`` stops QEMU),
crashed, or been destroyed behind vmorch's back. The registry is repaired, one VM at a
time under its lock, so that ``vm list`` tells the truth before any job runs. VMs with
unfinished jobs are left to those jobs, which record the state they leave.
"""

from __future__ import annotations

import logging

from orchestrator.control import locks
from orchestrator.control.locks import vm_lock
from orchestrator.model.errors import NotFound, VmorchError

from .runner import Worker

log = logging.getLogger(__name__)


def reconcile(w: Worker) -> dict[str, tuple[str, str]]:
    """Repair the state of this host's VMs; returns {"ns/name": (was, now)} for each repair."""
    repaired: dict[str, tuple[str, str]] = {}
    for namespace, name in w.store.vms_on_host(w.host):
        if w.store.mailbox(namespace, name):
            continue
        lock = vm_lock(namespace, name)
        with w.locks.hold(lock, timeout=w.settings.lock_expire + 2) as holding:
            locks.require(lock)  # LOCK: vm -- no job changes the VM between this read and the update below
            try:
                vm = w.store.get_vm(namespace, name, as_stored=True)
            except NotFound:
                continue
            try:
                actual = w.driver.status(vm.domain).state
            except VmorchError as exc:
                log.warning("cannot read %s from libvirt: %s", vm.domain, exc)
                continue
            if actual is not vm.state:
                w.store.update_vm(namespace, name, holding.fence(lock), {
                    "state": actual.value, "note": f"reconciled at worker start: was {vm.state.value}"},
                    by=f"reconcile@{w.name}")
                repaired[f"{namespace}/{name}"] = (vm.state.value, actual.value)
    for vm_name, (was, now) in sorted(repaired.items()):
        log.info("reconciled %s: registry said %s, libvirt says %s", vm_name, was, now)
    return repaired
