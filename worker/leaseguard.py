"""The guard on libvirt changes: each is checked against the lease and fencing token it acts under.

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

The guard wraps what ``worker.libvirtconn.LibvirtConnection`` opens (``_guard_connection``);
``Lease`` and ``under_lease`` are re-exported there.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import libvirt

from orchestrator.model.errors import FencedOut

from . import domxml

# The change log keeps the connection's logger name: the lines read the same as before the guard
# had its own module.
log = logging.getLogger("worker.libvirtconn")


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
