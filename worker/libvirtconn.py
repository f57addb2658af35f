"""The driver's libvirt connection: opening (and reopening) it, looking at domains, vmorch's
metadata in them, and libvirt's errors as vmorch errors. The base of ``worker.driver.Driver``.

No ``libvirtError`` escapes this package: ``translate`` turns each into the vmorch error a
user can act on.

No libvirt change without a valid lease (guarantee 6). The connection and every domain it
hands out are guarded: each call that changes a domain (start, destroy, shutdown, suspend,
define, undefine, metadata, resources, snapshots, migration, ...) first asks the lease the
calling job acts under (``under_lease``, set by the runner) whether it is still valid -- known
locally, no Redis round trip -- then compares the fencing token in the domain's vmorch metadata
with the holder's: a higher one there means another holder acted (``FencedOut``, nothing
changed); a lower one is replaced by the holder's before the change, so the domain itself says
which lock generation last changed it. Whatever changes a domain is logged, one line a call:
``libvirt change: <call> <domain> fence=<token> start=<monotonic> end=<monotonic>
lease_end=<monotonic>`` (``-`` outside a lease: worker start, ``vmorch down``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

import libvirt

from orchestrator.model.errors import (
    AlreadyExists,
    FencedOut,
    HypervisorError,
    InvalidState,
    NotFound,
    OperationTimeout,
    VmGone,
    VmorchError,
)
from orchestrator.model.records import VmState

from . import domxml
from .eventloop import ensure_event_loop

log = logging.getLogger(__name__)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: VmState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VmState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VmState.RUNNING,  # "being shut down": still running
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
}
INSTALL_HINT = "run scripts/install.sh as root on this host (it creates the libvirt-qemu user)"
_QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'


@dataclass(frozen=True)
class DomainStatus:
    domain: str
    state: VmState
    memory_mib: int  # current memory of the persistent definition
    vcpus: int
    snapshots: list[str]
    metadata: dict[str, Any]


def vmorch_error(exc: libvirt.libvirtError, domain: str, action: str) -> VmorchError:
    code = exc.get_error_code()
    message = f"cannot {action} {domain}: {exc.get_error_message() or exc}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VmGone(f"{domain} does not exist on this host", hint="it was deleted, or never launched here")
    if code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
        return NotFound(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return InvalidState(message)
    if code == libvirt.VIR_ERR_DOM_EXIST:
        return AlreadyExists(message)
    if code in (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE):
        return OperationTimeout(message)
    return HypervisorError(message)


@contextlib.contextmanager
def translate(domain: str, action: str) -> Iterator[None]:
    """Translate libvirt errors raised inside into vmorch errors."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise vmorch_error(exc, domain, action) from exc


def state_of(dom: libvirt.virDomain) -> VmState:
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return VmState.CRASHED
    return _STATES.get(state, VmState.UNKNOWN)


def _close_quietly(conn: libvirt.virConnect | None) -> None:
    if conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# -- acting under a lease (guarantee 6) -------------------------------------------------


def _never(_token: int) -> None:
    return None


@dataclass(frozen=True)
class Lease:
    """What a lock holder gives the driver for the libvirt calls of one job (``under_lease``).

    ``check`` raises a ``LockError`` unless the holder knows, locally, that its locks are still
    its own; ``ends_at`` is the ``time.monotonic()`` at which that knowledge ends; ``fence`` is the
    VM lock's fencing token; ``newer_seen`` is told of a higher token found in a domain before
    ``FencedOut`` is raised (the lock's counter in Redis may have lost it).
    """

    fence: int
    check: Callable[[], None]
    ends_at: Callable[[], float]
    newer_seen: Callable[[int], None] = _never


_lease: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("vmorch_libvirt_lease", default=None)
_T = TypeVar("_T")


@contextlib.contextmanager
def under_lease(lease: Lease) -> Iterator[None]:
    """Every libvirt change this context makes inside is checked against ``lease`` first."""
    token = _lease.set(lease)
    try:
        yield
    finally:
        _lease.reset(token)


def _record(call: str, domain: str, lease: Lease | None, do: Callable[[], _T]) -> _T:
    """Make one change, and log it with when it ran and when the lease it ran under ended."""
    lease_end = lease.ends_at() if lease is not None else None
    start = time.monotonic()
    outcome = "error"
    try:
        result = do()
        outcome = "ok"
        return result
    finally:
        log.info("libvirt change: %s %s fence=%s start=%.6f end=%.6f lease_end=%s %s", call, domain,
                 lease.fence if lease is not None else "-", start, time.monotonic(),
                 f"{lease_end:.6f}" if lease_end is not None else "-", outcome)


def _domain_fence(dom: libvirt.virDomain) -> domxml.VmorchMeta | None:
    try:
        fragment = libvirt.virDomain.metadata(dom, libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.NS,
                                              libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None  # not vmorch's: no token to compare
        raise
    return domxml.parse_fragment(str(fragment))


def _claim(dom: libvirt.virDomain, domain: str, lease: Lease, *, stamp: bool) -> None:
    """Refuse a domain another holder acted on; else (``stamp``) write this holder's token into it."""
    meta = _domain_fence(dom)
    if meta is None:
        return
    if meta.fence > lease.fence:
        lease.newer_seen(meta.fence)
        raise FencedOut(f"{domain} carries fencing token {meta.fence}, newer than this holder's {lease.fence}: "
                        "another holder acted on it; nothing was changed",
                        hint="the job runs again under a new lock")
    if stamp and meta.fence < lease.fence:
        lease.check()
        fragment = domxml.metadata_fragment(replace(meta, fence=lease.fence))
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        _record("setMetadata", domain, lease, lambda: libvirt.virDomain.setMetadata(
            dom, libvirt.VIR_DOMAIN_METADATA_ELEMENT, fragment, domxml.PREFIX, domxml.NS, flags))


def _guarded(call: str, dom: libvirt.virDomain | None, domain: str, do: Callable[[], _T], *,
             stamp: bool = True) -> _T:
    lease = _lease.get()
    if lease is not None:
        lease.check()
        if dom is not None:
            _claim(dom, domain, lease, stamp=stamp)
            lease.check()  # the claim was a libvirt round trip
    return _record(call, domain, lease, do)


class _GuardedDomain(libvirt.virDomain):  # type: ignore[misc]
    """A domain whose changing calls go through ``_guarded`` (the methods are set below)."""

    def setMetadata(self, type: int, metadata: str | None, key: str | None, uri: str | None,
                    flags: int = 0) -> int:
        lease = _lease.get()
        if lease is not None and uri == domxml.NS and metadata:
            # vmorch's own element: it carries this holder's token (a tag change must not lower it)
            meta = domxml.parse_fragment(metadata)
            if meta.fence < lease.fence:
                metadata = domxml.metadata_fragment(replace(meta, fence=lease.fence))
        return int(_guarded("setMetadata", self, str(self.name()),
                            lambda: libvirt.virDomain.setMetadata(self, type, metadata, key, uri, flags), stamp=False))


#: the domain calls that change something, and whether the holder's token is written before each
#: (not before one that removes the domain or puts back an older definition: only compared)
_DOMAIN_CHANGES = {
    **dict.fromkeys((
        "create", "createWithFlags", "destroy", "destroyFlags", "shutdown", "shutdownFlags", "reboot", "reset",
        "suspend", "resume", "pMWakeup", "pMSuspendForDuration", "setMemory", "setMemoryFlags", "setMaxMemory",
        "setVcpus", "setVcpusFlags", "setVcpu", "setGuestVcpus", "snapshotCreateXML", "checkpointCreateXML",
        "migrate", "migrate2", "migrate3", "migrateToURI", "migrateToURI2", "migrateToURI3",
        "migrateStartPostCopy", "managedSave", "managedSaveDefineXML", "save", "saveFlags", "saveParams",
        "attachDevice", "attachDeviceFlags", "detachDevice", "detachDeviceFlags", "updateDeviceFlags",
        "setAutostart", "injectNMI", "sendKey", "setUserPassword", "setTime", "blockResize", "blockCommit",
        "blockPull", "blockRebase", "blockCopy", "setBlockIoTune", "setSchedulerParameters",
        "setSchedulerParametersFlags", "setBlkioParameters", "setMemoryParameters", "setNumaParameters",
        "setInterfaceParameters", "setPerfEvents", "setIOThreadParams", "addIOThread", "delIOThread", "pinVcpu",
        "pinVcpuFlags", "pinEmulator", "pinIOThread", "setLifecycleAction", "coreDump", "coreDumpWithFormat",
        "authorizedSSHKeysSet"), True),
    **dict.fromkeys(("undefine", "undefineFlags", "revertToSnapshot", "rename"), False),
}


def _guard_method(name: str, stamp: bool) -> Callable[..., Any]:
    unguarded = getattr(libvirt.virDomain, name)

    def method(self: libvirt.virDomain, *args: Any, **kwargs: Any) -> Any:
        return _guarded(name, self, str(self.name()), lambda: unguarded(self, *args, **kwargs), stamp=stamp)

    method.__name__ = method.__qualname__ = name
    return method


for _name, _stamp in _DOMAIN_CHANGES.items():
    if hasattr(libvirt.virDomain, _name):  # libvirt-python of this host may lack the newest calls
        setattr(_GuardedDomain, _name, _guard_method(_name, _stamp))


def _guard_domain(dom: libvirt.virDomain) -> libvirt.virDomain:
    # The same object, C handle and all (one owner frees it): only its calls that change things differ.
    dom.__class__ = _GuardedDomain
    return dom


class _GuardedConnect(libvirt.virConnect):  # type: ignore[misc]
    """A connection whose domains are guarded, and whose calls that create domains are too."""

    def lookupByName(self, name: str) -> libvirt.virDomain:
        return _guard_domain(super().lookupByName(name))

    def lookupByUUIDString(self, uuidstr: str) -> libvirt.virDomain:
        return _guard_domain(super().lookupByUUIDString(uuidstr))

    def lookupByUUID(self, uuid: bytes) -> libvirt.virDomain:
        return _guard_domain(super().lookupByUUID(uuid))

    def lookupByID(self, id: int) -> libvirt.virDomain:
        return _guard_domain(super().lookupByID(id))

    def listAllDomains(self, flags: int | None = 0) -> list[libvirt.virDomain]:
        return [_guard_domain(d) for d in super().listAllDomains(flags)]

    def defineXML(self, xml: str) -> libvirt.virDomain:
        return _guard_domain(_guarded("defineXML", None, _name_in(xml),
                                      lambda: libvirt.virConnect.defineXML(self, xml)))

    def defineXMLFlags(self, xml: str, flags: int | None = 0) -> libvirt.virDomain:
        return _guard_domain(_guarded("defineXMLFlags", None, _name_in(xml),
                                      lambda: libvirt.virConnect.defineXMLFlags(self, xml, flags)))

    def createXML(self, xmlDesc: str, flags: int | None = 0) -> libvirt.virDomain:
        return _guard_domain(_guarded("createXML", None, _name_in(xmlDesc),
                                      lambda: libvirt.virConnect.createXML(self, xmlDesc, flags)))


def _name_in(xml: str) -> str:
    """The domain's name in its XML, for the log line."""
    try:
        return ET.fromstring(xml).findtext("name") or "?"
    except ET.ParseError:
        return "?"  # libvirt will say what is wrong with it


def _guard_connection(conn: libvirt.virConnect) -> libvirt.virConnect:
    conn.__class__ = _GuardedConnect
    return conn


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
