"""The libvirt driver of the host agent: the only module that operates domains.

Every operation is idempotent (a redelivered job must change the VM at most once), looks
at the domain's state first so that conflicting states get a clear answer instead of
whatever libvirt's hypervisor driver happens to say (the test driver answers "internal
error" where QEMU says "operation invalid"), and never lets a ``libvirtError`` escape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import libvirt

from orchestrator.model.errors import (
    AlreadyExists,
    HypervisorError,
    InvalidInput,
    InvalidState,
    NotFound,
    OperationTimeout,
    VmGone,
    VmorchError,
)
from orchestrator.model.records import VmState, domain_name

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
_IT_IS = {
    VmState.RUNNING: "it is running",
    VmState.PAUSED: "it is paused",
    VmState.SHUTOFF: "it is shut off",
    VmState.CRASHED: "it has crashed",
    VmState.MISSING: "it does not exist",
    VmState.UNKNOWN: "its state is unknown",
}
_UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
_POLL_S = 0.2
_INSTALL_HINT = "run scripts/install.sh as root on this host (it creates the libvirt-qemu user)"
_QEMU_CONF = 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n'


@dataclass(frozen=True)
class DomainSpec:
    namespace: str
    vm: str
    memory_mib: int
    vcpus: int
    disk_gib: int = 1  # 0 = no disk; else vmorch creates a qcow2 of this size
    image: str | None = None  # absolute path of a backing image for that qcow2
    tags: Mapping[str, str] = field(default_factory=dict)
    job_id: int = 0
    fence: int = 0

    @property
    def domain(self) -> str:
        return domain_name(self.namespace, self.vm)


@dataclass(frozen=True)
class DomainStatus:
    domain: str
    state: VmState
    memory_mib: int  # current memory of the persistent definition
    vcpus: int
    snapshots: list[str]
    metadata: dict[str, Any]


def _error(exc: libvirt.libvirtError, domain: str, action: str) -> VmorchError:
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
def _libvirt(domain: str, action: str) -> Iterator[None]:
    """Translate libvirt errors raised inside into vmorch errors."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise _error(exc, domain, action) from exc


def _state_of(dom: libvirt.virDomain) -> VmState:
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return VmState.CRASHED
    return _STATES.get(state, VmState.UNKNOWN)


def _result(state: VmState, changed: bool, note: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"state": state.value, "changed": changed, **extra}
    if note:
        out["note"] = note
    return out


def _qemu_img(*args: str) -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise HypervisorError("qemu-img is not installed on this host", hint=_INSTALL_HINT)
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _try_live(notes: list[str], what: str, call: Callable[[], Any]) -> bool:
    try:
        call()
        return True
    except libvirt.libvirtError as exc:
        # Not fatal: the persistent definition already has the new value.
        notes.append(f"{what} applies at the next boot ({exc.get_error_message() or exc})")
        return False


def _create(dom: libvirt.virDomain) -> None:
    if dom.isActive():  # crashed but kept for inspection (on_crash=preserve)
        raise InvalidState(f"cannot start {dom.name()}: it has crashed and is still active; kill it first")
    dom.create()


def _wake(dom: libvirt.virDomain) -> None:
    if dom.state()[0] == libvirt.VIR_DOMAIN_PMSUSPENDED:
        dom.pMWakeup(0)  # a guest-initiated suspend (S3/S4) is not undone by resume()
    else:
        dom.resume()


def _close_quietly(conn: libvirt.virConnect | None) -> None:
    if conn is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


class Driver:
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
            return libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            msg = exc.get_error_message() or str(exc)
            hint = None
            if "Failed to parse user" in msg:
                # The embedded driver resolves its compiled-in default user before reading qemu.conf.
                hint = _INSTALL_HINT
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

    def capacity(self) -> tuple[int, int]:
        with _libvirt(self.uri, "query"):
            info = self.conn.getInfo()
        return int(info[2]), int(info[1])

    # -- looking at domains -------------------------------------------------------------

    def _lookup(self, domain: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _error(exc, domain, "look up") from exc

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
        with _libvirt(name, "inspect"):
            xml = self._config(dom)
            state = _state_of(dom)
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
        with _libvirt(self.uri, "list domains of"):
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

    # -- lifecycle ----------------------------------------------------------------------

    def _create_disk(self, spec: DomainSpec, path: Path) -> None:
        size = spec.disk_gib * 1024**3
        args = ["create", "-q", "-f", "qcow2"]
        if spec.image:
            if not Path(spec.image).is_file():
                raise InvalidInput(f"image {spec.image} does not exist on this host")
            # -U: the image may be open in a running VM; we only read its format and size.
            info = json.loads(_qemu_img("info", "-U", "--output=json", spec.image))
            args += ["-b", spec.image, "-F", str(info["format"])]
            size = max(size, int(info.get("virtual-size", 0)))
        # A leftover from a launch that died before defining the domain: nobody uses it.
        path.unlink(missing_ok=True)
        _qemu_img(*args, str(path), str(size))

    def launch(self, spec: DomainSpec) -> dict[str, Any]:
        domain = spec.domain
        if spec.memory_mib <= 0 or spec.vcpus <= 0 or spec.disk_gib < 0:
            raise InvalidInput(f"cannot launch {domain}: memory, vcpus and disk size must be positive")
        if spec.image and not spec.disk_gib:
            raise InvalidInput(f"cannot launch {domain}: an image needs a disk", hint="give a disk size")
        dom = self._lookup(domain)
        if dom is not None:
            return self._relaunch(dom, spec)
        disk = self.storage_dir / f"{domain}.qcow2" if spec.disk_gib else None
        # The test driver never opens the file, but creating it keeps delete's clean-up honest.
        if disk and (self.virt_type == "qemu" or shutil.which("qemu-img")):
            self._create_disk(spec, disk)
        disk_path = str(disk) if disk else None
        meta = domxml.VmorchMeta(spec.namespace, spec.vm, dict(spec.tags), spec.job_id, spec.fence, disk_path)
        xml = domxml.domain_xml(
            name=domain,
            virt_type=self.virt_type,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            disk=disk_path,
            meta=meta,
        )
        try:
            with _libvirt(domain, "define"):
                # No VIR_DOMAIN_DEFINE_VALIDATE: the RNG schema check cost ~13 ms of every launch (20x the
                # define itself) for XML built from one template; tests/test_domxml.py validates its shapes.
                dom = self.conn.defineXML(xml)
            with _libvirt(domain, "start"):
                dom.create()
        except VmorchError:
            # Undo only what this call did, so that a retry of the failed launch starts from scratch.
            with contextlib.suppress(libvirt.libvirtError):
                if dom is not None:
                    dom.undefineFlags(_UNDEFINE_FLAGS)
            if disk:
                disk.unlink(missing_ok=True)
            raise
        return _result(_state_of(dom), True, domain=domain, disk=disk_path)

    def _relaunch(self, dom: libvirt.virDomain, spec: DomainSpec) -> dict[str, Any]:
        """The launch of a domain that exists: a redelivered job, or a name clash."""
        domain = spec.domain
        with _libvirt(domain, "inspect"):
            meta = domxml.parse_metadata(self._config(dom))
            state = _state_of(dom)
        if meta is None or (meta.namespace, meta.vm) != (spec.namespace, spec.vm):
            raise AlreadyExists(f"a libvirt domain named {domain} exists and vmorch did not create it")
        if state in (VmState.RUNNING, VmState.PAUSED):
            return _result(state, False, "already launched", domain=domain, disk=meta.disk)
        self.start(domain)
        return _result(_state_of(dom), True, "already defined; started it", domain=domain, disk=meta.disk)

    def _transition(
        self,
        domain: str,
        verb: str,
        sources: tuple[VmState, ...],
        target: VmState | None,
        call: Callable[[libvirt.virDomain], object],
        if_paused: str = "",
    ) -> dict[str, Any]:
        """Call ``call`` if the domain is in one of ``sources``; a no-op in ``target``; else a clear refusal."""
        dom = self._require(domain)
        with _libvirt(domain, verb):
            state = _state_of(dom)
            if state == target:
                return _result(state, False, f"already {target.value}")
            if state not in sources:
                advice = if_paused if state == VmState.PAUSED else ""
                raise InvalidState(f"cannot {verb} {domain}: {_IT_IS[state]}{advice}")
            call(dom)
            return _result(_state_of(dom), True)

    def start(self, domain: str) -> dict[str, Any]:
        # CRASHED covers "shut off, reason crashed"; a crashed domain kept active needs a kill first.
        return self._transition(
            domain, "start", (VmState.SHUTOFF, VmState.CRASHED), VmState.RUNNING, _create, "; use resume"
        )

    def stop(self, domain: str, *, timeout_s: float, force: bool, check: Callable[[], None]) -> dict[str, Any]:
        dom = self._require(domain)
        with _libvirt(domain, "stop"):
            state = _state_of(dom)
            if not dom.isActive():
                return _result(state, False, f"already {state.value}")
            if state == VmState.PAUSED:
                # QEMU refuses shutdown() of a paused domain: its guest can't see the ACPI event.
                if not force:
                    raise InvalidState(
                        f"cannot stop {domain} gracefully: it is paused", hint="resume it, or use --force"
                    )
                dom.destroy()
                return _result(_state_of(dom), True, "forced off: it was paused")
            dom.shutdown()
            deadline = time.monotonic() + timeout_s
            while True:
                check()
                if not dom.isActive():
                    return _result(_state_of(dom), True)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(_POLL_S, remaining))
            if not force:
                raise OperationTimeout(
                    f"{domain} did not shut down within {timeout_s:g}s",
                    hint="the guest ignored the ACPI power button; use --force to power it off",
                )
            with contextlib.suppress(libvirt.libvirtError):  # it may have gone off just now
                dom.destroy()
            return _result(_state_of(dom), True, f"forced off after {timeout_s:g}s")

    def kill(self, domain: str) -> dict[str, Any]:
        dom = self._lookup(domain)
        if dom is None:
            return _result(VmState.MISSING, False, "no such domain")
        with _libvirt(domain, "kill"):
            if not dom.isActive():
                return _result(_state_of(dom), False, "already off")
            dom.destroy()
            return _result(_state_of(dom), True)

    def pause(self, domain: str) -> dict[str, Any]:
        return self._transition(domain, "pause", (VmState.RUNNING,), VmState.PAUSED, lambda dom: dom.suspend())

    def resume(self, domain: str) -> dict[str, Any]:
        return self._transition(domain, "resume", (VmState.PAUSED,), VmState.RUNNING, _wake)

    def reboot(self, domain: str) -> dict[str, Any]:
        # An ACPI request, like `virsh reboot`: the guest OS carries it out (an OS-less guest ignores it).
        result = self._transition(
            domain, "reboot", (VmState.RUNNING,), None, lambda dom: dom.reboot(0), "; resume it first"
        )
        return {**result, "note": "reboot requested from the guest"}

    def delete(self, domain: str) -> dict[str, Any]:
        dom = self._lookup(domain)
        disks = {self.storage_dir / f"{domain}.qcow2"}
        changed = False
        if dom is not None:
            with _libvirt(domain, "delete"):
                meta = domxml.parse_metadata(self._config(dom))
                # Only a file vmorch named after this domain; metadata is not proof of ownership.
                if meta and meta.disk and Path(meta.disk).name == f"{domain}.qcow2":
                    disks.add(Path(meta.disk))
                if dom.isActive():
                    dom.destroy()
                # Internal snapshots live in the qcow2 we delete below: dropping their metadata suffices.
                dom.undefineFlags(_UNDEFINE_FLAGS)
            changed = True
        removed = []
        for disk in sorted(disks):
            if disk.exists():
                disk.unlink()
                removed.append(str(disk))
        note = None if dom is not None else "no such domain"
        return _result(VmState.MISSING, changed or bool(removed), note, disks_removed=removed)

    # -- moving between hosts ------------------------------------------------------------

    def disk_path(self, domain: str) -> Path:
        return self.storage_dir / f"{domain}.qcow2"

    def export(self, domain: str) -> tuple[str, Path | None]:
        """The definition of a shut-off domain and the disk vmorch created for it (``vm move``)."""
        dom = self._require(domain)
        with _libvirt(domain, "export"):
            state = _state_of(dom)
            if dom.isActive():
                raise InvalidState(f"cannot move {domain}: it is {state.value}; only a shut-off VM moves",
                                   hint="stop it first ('vmorch vm stop NAME --force'); live moves need libvirtd")
            if dom.snapshotNum(0):
                raise InvalidState(f"cannot move {domain}: it has snapshots, which don't move with it",
                                   hint="moving a VM with snapshots is not supported")
            xml = self._config(dom)
        meta = domxml.parse_metadata(xml)
        disk = Path(meta.disk) if meta and meta.disk and Path(meta.disk).name == f"{domain}.qcow2" else None
        return xml, disk if disk is not None and disk.exists() else None

    def import_domain(self, domain: str, xml: str, disk: Path | None) -> dict[str, Any]:
        """Define a domain exported by another host; its disk is already at ``disk``. Idempotent."""
        existing = self._lookup(domain)
        if existing is not None:
            return _result(_state_of(existing), False, "already here")
        meta = domxml.parse_metadata(xml)
        if meta is None:
            raise InvalidState(f"cannot import {domain}: the definition has no vmorch metadata")
        if disk is not None and meta.disk:
            xml = domxml.relocate_disk(xml, meta.disk, str(disk))
        with _libvirt(domain, "import"):
            dom = self.conn.defineXML(xml)
        if disk is not None:
            self._write_meta(dom, domain, replace(meta, disk=str(disk)))
        return _result(_state_of(dom), True, disk=str(disk) if disk else None)

    def migrate_live(self, domain: str, dest_uri: str, *, shared_storage: bool) -> dict[str, Any]:
        """Live-migrate a running domain to the libvirtd at ``dest_uri`` (peer to peer), keeping it defined there.

        The disk stays where it is: both hosts must see it at the same path. libvirt refuses what it
        can't tell is shared; ``shared_storage`` is the operator's word that it is (VIR_MIGRATE_UNSAFE).
        """
        dom = self._require(domain)
        with _libvirt(domain, "live-migrate"):
            if not dom.isActive():
                raise InvalidState(f"cannot live-migrate {domain}: it is {_state_of(dom).value}",
                                   hint="move it without --live")
            if dom.snapshotNum(0):
                raise InvalidState(f"cannot move {domain}: it has snapshots, which don't move with it")
            flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                     | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
            if shared_storage:
                flags |= libvirt.VIR_MIGRATE_UNSAFE
            dom.migrateToURI3(dest_uri, {}, flags)
        return _result(VmState.RUNNING, True, f"live-migrated to {dest_uri}")

    def destroy_all(self, *, vmorch_only: bool = True) -> int:
        """Power off running domains (by default only vmorch's: a libvirtd host may run others)."""
        count = 0
        with _libvirt(self.uri, "list domains of"):
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

    # -- attributes ---------------------------------------------------------------------

    def set_resources(self, domain: str, *, memory_mib: int | None, vcpus: int | None) -> dict[str, Any]:
        if (memory_mib is not None and memory_mib <= 0) or (vcpus is not None and vcpus <= 0):
            raise InvalidInput(f"cannot resize {domain}: memory and vcpus must be positive")
        dom = self._require(domain)
        notes: list[str] = []
        applied_live = False
        config, live_flag = libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_AFFECT_LIVE
        with _libvirt(domain, "resize"):
            old_mem, old_max_mem, old_vcpus, old_max_vcpus = domxml.parse_resources(self._config(dom))
            active = bool(dom.isActive())
            if memory_mib is not None and (memory_mib, memory_mib) != (old_mem, old_max_mem):
                # Maximum first: that also clamps current memory, and the next boot gets exactly this much.
                dom.setMemoryFlags(memory_mib * 1024, config | libvirt.VIR_DOMAIN_MEM_MAXIMUM)
                dom.setMemoryFlags(memory_mib * 1024, config)
            if vcpus is not None and (vcpus, vcpus) != (old_vcpus, old_max_vcpus):
                # The current count may never exceed the maximum: raise max first, lower it last.
                order = [libvirt.VIR_DOMAIN_VCPU_MAXIMUM, 0]
                for extra in order if vcpus > old_max_vcpus else reversed(order):
                    dom.setVcpusFlags(vcpus, config | extra)
            if active and memory_mib is not None and int(dom.info()[2]) != memory_mib * 1024:
                live_max = int(dom.maxMemory()) // 1024
                if memory_mib > live_max:  # the balloon can only give back what QEMU was started with
                    notes.append(f"memory applies at the next boot (the running VM's maximum is {live_max} MiB)")
                else:
                    applied_live |= _try_live(notes, "memory", lambda: dom.setMemoryFlags(memory_mib * 1024, live_flag))
            if active and vcpus is not None and int(dom.vcpusFlags(live_flag)) != vcpus:
                applied_live |= _try_live(notes, "vcpus", lambda: dom.setVcpusFlags(vcpus, live_flag))
            new_mem, _, new_vcpus, _ = domxml.parse_resources(self._config(dom))
        changed = (new_mem, new_vcpus) != (old_mem, old_vcpus) or applied_live
        live = active and not notes
        return _result(_state_of(dom), changed, "; ".join(notes), memory_mib=new_mem, vcpus=new_vcpus, live=live)

    def _meta(self, dom: libvirt.virDomain, domain: str) -> domxml.VmorchMeta:
        # Only vmorch's element, not the whole definition: every job writes its fence here, and
        # rendering and parsing the full XML cost ten times the pause it followed (test driver).
        with _libvirt(domain, "read metadata of"):
            try:
                fragment = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.NS,
                                        libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    raise InvalidState(f"{domain} is not managed by vmorch (no vmorch metadata)") from None
                raise
        return domxml.parse_fragment(str(fragment))

    def _write_meta(self, dom: libvirt.virDomain, domain: str, meta: domxml.VmorchMeta) -> None:
        with _libvirt(domain, "write metadata of"):
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

    # -- snapshots ----------------------------------------------------------------------

    def _snapshot(self, dom: libvirt.virDomain, domain: str, name: str) -> libvirt.virDomainSnapshot | None:
        try:
            return dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise _error(exc, domain, "look up snapshots of") from exc

    def snapshot(self, domain: str, name: str, *, job_id: int) -> dict[str, Any]:
        dom = self._require(domain)
        description = domxml.job_description(job_id)
        existing = self._snapshot(dom, domain, name)
        with _libvirt(domain, "snapshot"):
            if existing is not None:
                if domxml.parse_description(existing.getXMLDesc(0)) != description:
                    raise AlreadyExists(f"{domain} already has a snapshot named {name!r}", hint="pick another name")
                return _result(_state_of(dom), False, "already taken", snapshot=name)
            dom.snapshotCreateXML(domxml.snapshot_xml(name, description), 0)
            return _result(_state_of(dom), True, snapshot=name)

    def revert(self, domain: str, name: str) -> dict[str, Any]:
        dom = self._require(domain)
        snap = self._snapshot(dom, domain, name)
        if snap is None:
            raise NotFound(f"{domain} has no snapshot named {name!r}")
        meta = self._meta(dom, domain)
        with _libvirt(domain, "revert"):
            dom.revertToSnapshot(snap, 0)
        # Reverting restores the whole definition, <metadata> included; vmorch's tags, fence
        # and job id describe the VM's management, not its contents, so they must survive.
        if self._meta(dom, domain) != meta:
            self._write_meta(dom, domain, meta)
        status = self._status_of(dom)
        return _result(status.state, True, snapshot=name, memory_mib=status.memory_mib, vcpus=status.vcpus)
