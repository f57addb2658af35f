"""The driver's libvirt connection: opening (and reopening) it, looking at domains, vmorch's
metadata in them, and libvirt's errors as vmorch errors. The base of ``worker.driver.Driver``.

No ``libvirtError`` escapes this package: ``translate`` turns each into the vmorch error a
user can act on.

No libvirt change without a valid lease (guarantee 6): the connection and every domain it hands
out are guarded (``worker.leaseguard``: ``Lease``, ``under_lease``, re-exported here). Domain
status and the error translation are in ``worker.domainstatus`` (re-exported here too).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import libvirt

from orchestrator.model.errors import HypervisorError, InvalidState, VmGone
from orchestrator.model.records import VmState

from . import domxml
from .domainstatus import INSTALL_HINT, DomainStatus, state_of, translate, vmorch_error
from .eventloop import ensure_event_loop
from .leaseguard import Lease, _guard_connection, under_lease

__all__ = ["INSTALL_HINT", "DomainStatus", "Lease", "LibvirtConnection", "state_of", "translate", "under_lease",
           "vmorch_error"]

log = logging.getLogger(__name__)

_QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'


def _close_quietly(conn: libvirt.virConnect | None) -> None:
    if conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


class LibvirtConnection:
    """One libvirt connection per process, shared by the worker's threads."""

    def __init__(self, uri: str, storage_dir: Path) -> None:
        ensure_event_loop()
        self.uri = uri
        self.storage_dir = Path(storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        scheme = uri.split(":", 1)[0].split("+", 1)[0]
        self.virt_type = "test" if scheme == "test" else "qemu"
        self._reconnect_lock = threading.Lock()
        self._conn: libvirt.virConnect | None = self._open()

    # -- connection ---------------------------------------------------------------------

    def _open(self) -> libvirt.virConnect:
        parsed = urlparse(self.uri)
        if parsed.scheme == "qemu" and parsed.path == "/embed":
            root = parse_qs(parsed.query).get("root", [""])[0]
            conf = Path(root, "etc", "qemu.conf")
            if root.startswith("/") and not conf.exists():  # libvirt itself refuses a relative root
                conf.parent.mkdir(parents=True, exist_ok=True)
                conf.write_text(_QEMU_CONF)
        try:
            return _guard_connection(libvirt.open(self.uri))
        except libvirt.libvirtError as exc:
            msg = exc.get_error_message() or str(exc)
            hint = None
            if "Failed to parse user" in msg:
                # The embedded driver resolves its compiled-in default user before reading qemu.conf.
                hint = INSTALL_HINT
            elif "Cannot open embedded driver" in msg:
                hint = "libvirt allows one embedded QEMU root per process, for the process's lifetime"
            raise HypervisorError(f"cannot open libvirt connection {self.uri}: {msg}", hint=hint) from exc

    @property
    def conn(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None:
            raise HypervisorError(f"the libvirt connection {self.uri} is closed")
        with contextlib.suppress(libvirt.libvirtError):
            if conn.isAlive():
                return conn
        if self.virt_type == "test":
            # The test driver's state lives in the connection: a new one would silently start empty.
            raise HypervisorError(f"the libvirt connection {self.uri} died; its domains are gone with it",
                                  hint="restart the worker; its reconciliation marks the VMs missing")
        # A restarted libvirtd leaves the old connection dead for good; reopen once for everyone.
        with self._reconnect_lock:
            if self._conn is conn:
                log.warning("libvirt connection %s is dead; reopening", self.uri)
                self._conn = self._open()
                _close_quietly(conn)
            if self._conn is None:
                raise HypervisorError(f"the libvirt connection {self.uri} is closed")
            return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        _close_quietly(conn)

    def register_events(self, callback: Callable[[str, int, int], None]) -> tuple[libvirt.virConnect, int]:
        """Call ``callback(domain, event, detail)`` on each domain lifecycle event (``worker.events``).

        It runs on libvirt's event-loop thread and must not block. Returns the connection and the
        callback id: a reopened connection has no subscription, so call again when ``conn`` changes.
        """
        conn = self.conn

        def relay(_conn: object, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
            callback(str(dom.name()), int(event), int(detail))

        with translate(self.uri, "subscribe to the domain events of"):
            callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, relay, None)
        return conn, int(callback_id)

    def capacity(self) -> tuple[int, int]:
        with translate(self.uri, "query"):
            info = self.conn.getInfo()
        return int(info[2]), int(info[1])

    def disk_path(self, domain: str) -> Path:
        """Where vmorch keeps the disk it creates for ``domain``."""
        return self.storage_dir / f"{domain}.qcow2"

    # -- looking at domains -------------------------------------------------------------

    def _lookup(self, domain: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise vmorch_error(exc, domain, "look up") from exc

    def _require(self, domain: str) -> libvirt.virDomain:
        dom = self._lookup(domain)
        if dom is None:
            raise VmGone(f"{domain} does not exist on this host", hint="it was deleted, or never launched here")
        return dom

    @staticmethod
    def _config(dom: libvirt.virDomain) -> str:
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    def _status_of(self, dom: libvirt.virDomain) -> DomainStatus:
        name = str(dom.name())
        with translate(name, "inspect"):
            xml = self._config(dom)
            state = state_of(dom)
            snapshots = sorted(str(s) for s in dom.snapshotListNames())
        memory, _, vcpus, _ = domxml.parse_resources(xml)
        meta = domxml.parse_metadata(xml)
        return DomainStatus(name, state, memory, vcpus, snapshots, meta.to_dict() if meta else {})

    def status(self, domain: str) -> DomainStatus:
        dom = self._lookup(domain)
        if dom is None:
            return DomainStatus(domain, VmState.MISSING, 0, 0, [], {})
        try:
            return self._status_of(dom)
        except VmGone:
            return DomainStatus(domain, VmState.MISSING, 0, 0, [], {})

    def list_domains(self) -> list[DomainStatus]:
        with translate(self.uri, "list domains of"):
            doms = self.conn.listAllDomains(0)
        out = []
        for dom in doms:
            try:
                status = self._status_of(dom)
            except VmGone:  # undefined while we were listing
                continue
            if status.metadata:
                out.append(status)
        return sorted(out, key=lambda s: s.domain)

    def destroy_all(self, *, vmorch_only: bool = True) -> int:
        """Power off running domains (by default only vmorch's: a libvirtd host may run others)."""
        count = 0
        with translate(self.uri, "list domains of"):
            doms = self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        for dom in doms:
            try:
                if vmorch_only and domxml.parse_metadata(dom.XMLDesc(0)) is None:
                    continue
                dom.destroy()
                count += 1
            except libvirt.libvirtError as exc:
                log.warning("cannot destroy %s: %s", dom.name(), exc)
        return count

    # -- vmorch's metadata --------------------------------------------------------------

    def _meta(self, dom: libvirt.virDomain, domain: str) -> domxml.VmorchMeta:
        # Only vmorch's element, not the whole definition: every job writes its fence here, and
        # rendering and parsing the full XML cost ten times the pause it followed (test driver).
        with translate(domain, "read metadata of"):
            try:
                fragment = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.NS,
                                        libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    raise InvalidState(f"{domain} is not managed by vmorch (no vmorch metadata)") from None
                raise
        return domxml.parse_fragment(str(fragment))

    def _write_meta(self, dom: libvirt.virDomain, domain: str, meta: domxml.VmorchMeta) -> None:
        with translate(domain, "write metadata of"):
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.metadata_fragment(meta), domxml.PREFIX, domxml.NS, flags
            )

    def set_metadata(
        self,
        domain: str,
        *,
        tags: Mapping[str, str] | None = None,
        fence: int | None = None,
        job_id: int | None = None,
    ) -> None:
        dom = self._require(domain)
        meta = self._meta(dom, domain)
        new = replace(
            meta,
            tags=dict(meta.tags if tags is None else tags),
            fence=meta.fence if fence is None else fence,
            job_id=meta.job_id if job_id is None else job_id,
        )
        if new != meta:
            self._write_meta(dom, domain, new)
