"""Which accelerator this host's guests get, found once at worker start, and applied to its domains.

``worker.accel.probe`` boots a probe under KVM (``VMORCH_ACCEL=kvm|tcg`` forces its answer). The
worker runs it in a thread while it starts (it takes up to a few seconds), then: new domains are
defined ``<domain type='kvm'>`` only if KVM really works here, else ``type='qemu'`` (TCG); every
shut-off vmorch domain of another type is redefined with this host's (a VM defined under KVM still
starts after the host lost it); and a VM moved in is given this host's type at its import
(``handlers._move_in``, with ``domxml.localize``). A running domain keeps its type until it is
redefined. The host record carries ``accel`` and ``accel_reason``.
"""

from __future__ import annotations

import logging
import threading

import libvirt

from . import accel, domxml
from .accel import Accel
from .libvirtconn import LibvirtConnection

log = logging.getLogger(__name__)


class AccelProbe:
    """``probe()`` in a thread: started early, its answer taken when the worker needs it."""

    def __init__(self, libvirt_uri: str) -> None:
        self.libvirt_uri = libvirt_uri
        self._answer: Accel | None = None
        self._thread = threading.Thread(target=self._run, name="vmorch-accel-probe", daemon=True)

    def start(self) -> AccelProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        if self.libvirt_uri.startswith("test:"):
            self._answer = Accel("tcg", "libvirt's test driver runs no guests")
        else:
            self._answer = accel.probe()

    def result(self, timeout: float = 60.0) -> Accel:
        self._thread.join(timeout)
        return self._answer or Accel("tcg", f"the KVM probe gave no answer within {timeout:g}s")


def apply(driver: LibvirtConnection, found: Accel) -> int:
    """Define new domains for ``found``, and redefine the shut-off ones of another type; how many."""
    if driver.virt_type not in ("qemu", "kvm"):
        return 0
    driver.virt_type = "kvm" if found.kind == "kvm" else "qemu"
    changed = 0
    for dom in driver.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE):
        try:
            xml = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if domxml.parse_metadata(xml) is None or domxml.domain_type(xml) == driver.virt_type:
                continue
            log_file, _ = domxml.console_of(xml)
            driver.conn.defineXML(domxml.localize(xml, virt_type=driver.virt_type, console_log=log_file))
            changed += 1
        except libvirt.libvirtError as exc:
            log.warning("cannot give %s this host's domain type %s: %s", dom.name(), driver.virt_type, exc)
    if changed:
        log.info("redefined %d shut-off domains as type %s (%s)", changed, driver.virt_type, found.reason)
    return changed
