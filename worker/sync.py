"""Keeps the registry in line with libvirt while the worker runs (the worker-start pass is ``reconcile``).

One thread per worker does two things, each VM through ``reconcile.repair`` (under the VM's
lock, skipped this round when a job holds it or has one queued: a job records the truth itself):

* on each libvirt lifecycle event (``worker.events``) it looks again at that domain's VM at
  once: a domain destroyed, crashed, undefined, paused or started behind vmorch's back shows in
  ``vm show`` within a fraction of a second;
* every ``drift_sync_interval`` seconds it lists the host's domains and compares state, memory,
  vCPUs and snapshots with the VM records of this host (what no lifecycle event tells: a memory
  or snapshot change, an event missed while the connection was being reopened). It also
  subscribes to events again on a reopened connection.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from orchestrator.model.errors import NotFound, VmorchError
from orchestrator.model.records import VmState, domain_name

from .events import DomainEvents
from .libvirtconn import DomainStatus
from .reconcile import Busy, drift, repair
from .runner import Worker

log = logging.getLogger(__name__)

#: how long a correction waits for a VM's lock before leaving the VM to the next round
LOCK_TIMEOUT_S = 0.5
#: with no periodic pass (interval 0), how often the connection is checked for a re-subscription
RESUBSCRIBE_S = 5.0
#: how soon a VM whose event came while a job held it is looked at again (the job may not record
#: what the event was about: a tag job during a crash)
RETRY_S = 1.0


class DriftSync:
    def __init__(self, worker: Worker, interval: float) -> None:
        self.worker = worker
        self.interval = interval
        self.events = DomainEvents(worker.driver)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmorch-drift-sync", daemon=True)
        #: domains whose VM was busy at their event, and when to look again
        self._retry: dict[str, float] = {}

    def subscribe(self) -> None:
        """Subscribe to libvirt's events (before the start-up reconciliation, so that nothing falls between)."""
        self.events.ensure()

    def start(self) -> None:
        self.events.ensure()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.events.queue.put("")  # wake the thread
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.events.close()

    # -- the thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        period = self.interval or RESUBSCRIBE_S
        next_pass = time.monotonic() + period
        while not self._stop.is_set():
            wake = min([next_pass, *self._retry.values()])
            try:
                first = self.events.queue.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                first = None
            if self._stop.is_set():
                return
            try:
                now = time.monotonic()
                due = {d for d, at in self._retry.items() if at <= now}
                if first or due:
                    self.on_events(({first} if first else set()) | self._drain() | due)
                if time.monotonic() >= next_pass:
                    self.events.ensure()
                    if self.interval:
                        self.full_pass()
                    next_pass = time.monotonic() + period
            except Exception:  # Redis restarting, libvirt gone: the thread must outlive it
                log.exception("drift sync pass failed; trying again")
                self._stop.wait(1.0)

    def _drain(self) -> set[str]:
        # An event rarely comes alone (stopped, then undefined; a job's several steps): take them all.
        if not self.events.queue.empty():
            time.sleep(0.05)
        more = set()
        while True:
            try:
                more.add(self.events.queue.get_nowait())
            except queue.Empty:
                return more - {""}

    # -- the work -----------------------------------------------------------------------

    def _vms_by_domain(self) -> dict[str, tuple[str, str]]:
        return {domain_name(ns, name): (ns, name) for ns, name in self.worker.store.vms_on_host(self.worker.host)}

    def on_events(self, domains: set[str]) -> int:
        """Look again at the VMs of these domains; returns how many were corrected.

        A VM a job holds or waits for is looked at again ``RETRY_S`` later, until it is free.
        """
        w = self.worker
        known = self._vms_by_domain()
        corrected = 0
        for domain in sorted(domains - {""}):
            self._retry.pop(domain, None)
            if domain not in known:  # not vmorch's, or not this host's (moved away, deleted)
                continue
            namespace, name = known[domain]
            try:
                if w.store.mailbox(namespace, name):  # a job runs or waits: it records the state it leaves
                    raise Busy(domain)
                if self._drifted(namespace, name, w.driver.status(domain)):
                    done = repair(w, namespace, name, by=f"libvirt@{w.host}", timeout=LOCK_TIMEOUT_S)
                    corrected += bool(done and done[1])
            except Busy:
                self._retry[domain] = time.monotonic() + RETRY_S
            except VmorchError as exc:  # libvirt did not answer: the periodic pass looks again
                log.warning("cannot read %s from libvirt: %s", domain, exc)
        return corrected

    def full_pass(self) -> int:
        """Compare every VM record of this host with libvirt; returns how many were corrected."""
        w = self.worker
        domains = {s.domain: s for s in w.driver.list_domains()}
        corrected = 0
        for namespace, name in w.store.vms_on_host(w.host):
            domain = domain_name(namespace, name)
            actual = domains.get(domain) or DomainStatus(domain, VmState.MISSING, 0, 0, [], {})
            if w.store.mailbox(namespace, name) or not self._drifted(namespace, name, actual):
                continue
            try:  # both sides are read again under the lock: the listing may be a moment old
                done = repair(w, namespace, name, by=f"sync@{w.host}", timeout=LOCK_TIMEOUT_S)
            except Busy:
                continue  # the next pass
            corrected += bool(done and done[1])
        return corrected

    def _drifted(self, namespace: str, name: str, actual: DomainStatus) -> bool:
        """Whether the record and libvirt disagree, read without the lock (most events are vmorch's own
        jobs' and find nothing to repair: they cost no lock)."""
        try:
            vm = self.worker.store.get_vm(namespace, name, as_stored=True)
        except NotFound:
            return False
        return vm.host == self.worker.host and bool(drift(vm, actual))
