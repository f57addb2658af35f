"""libvirt's domain lifecycle events, as a stream of domain names to look at again.

Every worker subscribes on its connection (``LibvirtConnection.register_events``): started,
stopped, crashed, undefined, suspended, resumed, shutdown, defined... libvirt calls back on its
event-loop thread (``worker.eventloop``, registered before the connection was opened), which
also drives QEMU's monitors: the callback only queues the domain's name, and ``worker.sync``
does the looking, under the VM's lock, on its own thread.

A reopened connection (libvirtd restarted) has no subscription: ``ensure`` subscribes again
when the driver's connection is another object than the one subscribed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading

import libvirt

from orchestrator.model.errors import VmorchError

from .driver import Driver

log = logging.getLogger(__name__)

EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


class DomainEvents:
    """The names of domains libvirt reported a lifecycle event for, in a queue."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._subscribed: tuple[libvirt.virConnect, int] | None = None

    def _on_event(self, domain: str, event: int, detail: int) -> None:
        # libvirt's event-loop thread: queue and return, never block
        log.debug("libvirt event: %s %s (detail %d)", domain, EVENTS.get(event, event), detail)
        self.queue.put(domain)

    def ensure(self) -> bool:
        """Subscribe on the driver's current connection unless subscribed there; True if it just did."""
        with self._lock:
            try:
                conn = self.driver.conn
                if self._subscribed is not None and self._subscribed[0] is conn:
                    return False
                self._subscribed = self.driver.register_events(self._on_event)
            except VmorchError as exc:
                log.warning("cannot subscribe to libvirt's domain events (the periodic sync goes on): %s", exc)
                return False
        log.info("subscribed to libvirt's domain lifecycle events on %s", self.driver.uri)
        return True

    def close(self) -> None:
        with self._lock:
            subscribed, self._subscribed = self._subscribed, None
        if subscribed is not None:
            conn, callback_id = subscribed
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
