"""The driver's lifecycle operations: launch, start, stop, kill, pause, resume, reboot, delete, and
resizing.

Every operation is idempotent (a redelivered job must change the VM at most once) and looks at the
domain's state first, so that conflicting states get a clear answer instead of whatever libvirt's
hypervisor driver happens to say (the test driver answers "internal error" where QEMU says
"operation invalid").
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from orchestrator.model.errors import (
    AlreadyExists,
    InvalidInput,
    InvalidState,
    LockError,
    OperationTimeout,
    VmorchError,
)
from orchestrator.model.records import VmState, domain_name

from . import domxml
from .disks import create_disk
from .libvirtconn import LibvirtConnection, state_of, translate
from .presses import PRESS_EVERY_S, RebootWatch, press_until
from .results import Deleted, DriverResult, Launched, Resized

_IT_IS = {
    VmState.RUNNING: "it is running",
    VmState.PAUSED: "it is paused",
    VmState.SHUTOFF: "it is shut off",
    VmState.CRASHED: "it has crashed",
    VmState.MISSING: "it does not exist",
    VmState.UNKNOWN: "its state is unknown",
}
UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
#: how long a resize waits for a guest's balloon driver to give memory back (or take it)
BALLOON_SETTLE_S = 2.0


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
    nics: tuple[domxml.NicDevice, ...] = ()  # none: one user-mode NIC

    @property
    def domain(self) -> str:
        return domain_name(self.namespace, self.vm)


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


def _powered_off(dom: libvirt.virDomain, changed: bool, note: str = "") -> DriverResult:
    """What a stop or a kill records once the domain is not running: ``shutoff``, whatever reason
    libvirt gives (a QEMU found gone after a worker restart is "shut off, reason crashed": the
    state the job promised is the state it records). Still running: libvirt's word."""
    if dom.isActive():
        return DriverResult(state_of(dom), changed, note)
    was = state_of(dom)
    if not changed and was is not VmState.SHUTOFF:
        note = f"{note} (libvirt says: {was.value})" if note else f"libvirt says: {was.value}"
    return DriverResult(VmState.SHUTOFF, changed, note)


def _request(dom: libvirt.virDomain, call: Callable[[], object]) -> None:
    """One shutdown or reboot request; none needed if the domain went off since the last look."""
    try:
        call()
    except libvirt.libvirtError:
        if dom.isActive():
            raise


def _requests(count: int, what: str) -> str:
    return f"{count} {what} request{'s' if count != 1 else ''}"


def _live_mib(dom: libvirt.virDomain) -> int:
    return int(dom.info()[2]) // 1024


def _settled_mib(dom: libvirt.virDomain, wanted: int) -> int:
    """The running VM's memory once its balloon reached ``wanted``, or after ``BALLOON_SETTLE_S``."""
    deadline = time.monotonic() + BALLOON_SETTLE_S
    while (mib := _live_mib(dom)) != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return mib


def _nothing() -> None:
    return None


def _wake(dom: libvirt.virDomain) -> None:
    if dom.state()[0] == libvirt.VIR_DOMAIN_PMSUSPENDED:
        dom.pMWakeup(0)  # a guest-initiated suspend (S3/S4) is not undone by resume()
    else:
        dom.resume()


class Lifecycle(LibvirtConnection):
    def launch(self, spec: DomainSpec) -> Launched:
        domain = spec.domain
        if spec.memory_mib <= 0 or spec.vcpus <= 0 or spec.disk_gib < 0:
            raise InvalidInput(f"cannot launch {domain}: memory, vcpus and disk size must be positive")
        if spec.image and not spec.disk_gib:
            raise InvalidInput(f"cannot launch {domain}: an image needs a disk", hint="give a disk size")
        dom = self._lookup(domain)
        if dom is not None:
            return self._relaunch(dom, spec)
        disk = self.disk_path(domain) if spec.disk_gib else None
        # The test driver never opens the file, but creating it keeps delete's clean-up honest.
        if disk and (self.virt_type == "qemu" or shutil.which("qemu-img")):
            create_disk(disk, spec.disk_gib, spec.image)
        disk_path = str(disk) if disk else None
        meta = domxml.VmorchMeta(spec.namespace, spec.vm, dict(spec.tags), spec.job_id, spec.fence, disk_path)
        xml = domxml.domain_xml(
            name=domain,
            virt_type=self.virt_type,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            disk=disk_path,
            meta=meta,
            # one place for every VM's console log, disk or not (console relay, delete, move-in agree)
            console_log=str(domxml.console_log_path(self.storage_dir, domain)),
            nics=spec.nics,
        )
        try:
            with translate(domain, "define"):
                # No VIR_DOMAIN_DEFINE_VALIDATE: the RNG schema check cost ~13 ms of every launch (20x the
                # define itself) for XML built from one template; tests/test_domxml.py validates its shapes.
                dom = self.conn.defineXML(xml)
            with translate(domain, "start"):
                dom.create()
        except LockError:
            raise  # the lease is gone: touch nothing more; the re-run finds what this call left and goes on
        except VmorchError:
            # Undo only what this call did, so that a retry of the failed launch starts from scratch.
            with contextlib.suppress(libvirt.libvirtError):
                if dom is not None:
                    dom.undefineFlags(UNDEFINE_FLAGS)
            if disk:
                disk.unlink(missing_ok=True)
            raise
        return Launched(state_of(dom), True, domain=domain, disk=disk_path)

    def _relaunch(self, dom: libvirt.virDomain, spec: DomainSpec) -> Launched:
        """The launch of a domain that exists: a redelivered job, or a name clash."""
        domain = spec.domain
        with translate(domain, "inspect"):
            meta = domxml.parse_metadata(self._config(dom))
            state = state_of(dom)
        if meta is None or (meta.namespace, meta.vm) != (spec.namespace, spec.vm):
            raise AlreadyExists(f"a libvirt domain named {domain} exists and vmorch did not create it")
        if state in (VmState.RUNNING, VmState.PAUSED):
            return Launched(state, False, "already launched", domain=domain, disk=meta.disk)
        self.start(domain)
        return Launched(state_of(dom), True, "already defined; started it", domain=domain, disk=meta.disk)

    def _transition(
        self,
        domain: str,
        verb: str,
        sources: tuple[VmState, ...],
        target: VmState | None,
        call: Callable[[libvirt.virDomain], object],
        if_paused: str = "",
    ) -> DriverResult:
        """Call ``call`` if the domain is in one of ``sources``; a no-op in ``target``; else a clear refusal."""
        dom = self._require(domain)
        with translate(domain, verb):
            state = state_of(dom)
            if state == target:
                return DriverResult(state, False, f"already {target.value}")
            if state not in sources:
                advice = if_paused if state == VmState.PAUSED else ""
                raise InvalidState(f"cannot {verb} {domain}: {_IT_IS[state]}{advice}")
            call(dom)
            return DriverResult(state_of(dom), True)

    def start(self, domain: str) -> DriverResult:
        # CRASHED covers "shut off, reason crashed"; a crashed domain kept active needs a kill first.
        return self._transition(
            domain, "start", (VmState.SHUTOFF, VmState.CRASHED), VmState.RUNNING, _create, "; use resume"
        )

    def stop(self, domain: str, *, timeout_s: float, force: bool, check: Callable[[], None],
             force_after_timeout: bool = False) -> DriverResult:
        """``force``: power off at once. Else a shutdown request (ACPI power button, or the guest agent
        where libvirt has one), repeated until the guest is off or ``timeout_s`` passed (``press_until``);
        then a timeout error, or with ``force_after_timeout`` a power-off. ``timeout_s`` 0: one request
        and no wait (the result says whether it is off yet)."""
        dom = self._require(domain)
        with translate(domain, "stop"):
            if not dom.isActive():
                return _powered_off(dom, False, "already off")
            paused = state_of(dom) == VmState.PAUSED
            if force or (paused and force_after_timeout):
                return self._force_off(dom, check, "forced off: it was paused" if paused else "forced off")
            if paused:
                # QEMU refuses shutdown() of a paused domain: its guest can't see the ACPI event.
                raise InvalidState(f"cannot stop {domain} gracefully: it is paused", hint="resume it, or use --force")
            pressed = press_until(lambda: _request(dom, dom.shutdown), lambda: not dom.isActive(), check,
                                  timeout_s=timeout_s)
            if pressed.done:
                return _powered_off(dom, True, f"shut down {pressed.seconds:.1f}s after the first shutdown request "
                                               f"({pressed.presses} sent)")
            if force_after_timeout:
                return self._force_off(dom, check, f"forced off after {timeout_s:g}s: the guest did not shut down "
                                                   f"({_requests(pressed.presses, 'shutdown')})")
            if timeout_s == 0:
                return DriverResult(state_of(dom), True, "shutdown requested; not waited for (--timeout 0)")
            raise OperationTimeout(
                f"{domain} did not shut down within {timeout_s:g}s ({_requests(pressed.presses, 'shutdown')}, "
                f"{PRESS_EVERY_S:g}s apart)",
                hint="the guest ignored the ACPI power button; 'vm stop --force' powers it off at once, "
                     "'--force-after-timeout' after the graceful try",
            )

    @staticmethod
    def _force_off(dom: libvirt.virDomain, check: Callable[[], None], note: str) -> DriverResult:
        check()
        with contextlib.suppress(libvirt.libvirtError):  # it may have gone off just now
            dom.destroy()
        return _powered_off(dom, True, note)

    def kill(self, domain: str) -> DriverResult:
        dom = self._lookup(domain)
        if dom is None:
            return DriverResult(VmState.MISSING, False, "no such domain")
        with translate(domain, "kill"):
            if not dom.isActive():
                return _powered_off(dom, False, "already off")
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                # It went off between the look and the destroy (a stop libvirt itself was finishing).
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
                    raise
                return _powered_off(dom, False, "already off")
            return _powered_off(dom, True)

    def pause(self, domain: str) -> DriverResult:
        return self._transition(domain, "pause", (VmState.RUNNING,), VmState.PAUSED, lambda dom: dom.suspend())

    def resume(self, domain: str) -> DriverResult:
        return self._transition(domain, "resume", (VmState.PAUSED,), VmState.RUNNING, _wake)

    def reboot(self, domain: str, *, timeout_s: float = 60.0, force: bool = False,
               check: Callable[[], None] = _nothing) -> DriverResult:
        """``force``: a reset (the power-cycle of the machine, no shutdown). Else a reboot request
        (ACPI, or the guest agent), repeated like stop's, until libvirt reports that the guest reset
        (its reboot event), or a clear failure once ``timeout_s`` passed (0: one request, no wait)."""
        dom = self._require(domain)
        with translate(domain, "reboot"):
            state = state_of(dom)
            if state != VmState.RUNNING:
                advice = "; resume it first" if state == VmState.PAUSED else ""
                raise InvalidState(f"cannot reboot {domain}: {_IT_IS[state]}{advice}")
            if force:
                check()
                dom.reset(0)
                return DriverResult(state_of(dom), True, "reset: the guest restarted at once, without shutting down")
            if self.virt_type == "test":  # no guest and no reboot event: libvirt's test driver reboots in the call
                check()
                dom.reboot(0)
                return DriverResult(state_of(dom), True, "rebooted (test driver)")
            with RebootWatch(self.conn, dom) as watch:
                pressed = press_until(lambda: _request(dom, dom.reboot), lambda: watch.happened() or not dom.isActive(),
                                      check, timeout_s=timeout_s)
                rebooted = watch.happened()
            if rebooted:
                return DriverResult(state_of(dom), True, f"rebooted: the guest reset {pressed.seconds:.1f}s after the "
                                                         f"first reboot request ({pressed.presses} sent)")
            if not dom.isActive():
                raise InvalidState(f"reboot did not happen: {domain} powered off instead", hint="start it: vm start")
            if timeout_s == 0:
                return DriverResult(state_of(dom), True, "reboot requested; not waited for (--timeout 0)")
            raise OperationTimeout(
                f"reboot did not happen: the guest did not react to the reboot request within {timeout_s:g}s "
                f"({_requests(pressed.presses, 'reboot')}, {PRESS_EVERY_S:g}s apart)",
                hint="'vm reboot --force' resets it (no clean shutdown); or 'vm stop --force' then 'vm start'",
            )

    def delete(self, domain: str) -> Deleted:
        dom = self._lookup(domain)
        disks = {self.disk_path(domain)}
        changed = False
        if dom is not None:
            with translate(domain, "delete"):
                meta = domxml.parse_metadata(self._config(dom))
                # Only a file vmorch named after this domain; metadata is not proof of ownership.
                if meta and meta.disk and Path(meta.disk).name == f"{domain}.qcow2":
                    disks.add(Path(meta.disk))
                if dom.isActive():
                    dom.destroy()
                # Internal snapshots live in the qcow2 we delete below: dropping their metadata suffices.
                dom.undefineFlags(UNDEFINE_FLAGS)
            changed = True
        removed = []
        for disk in sorted(disks):
            if disk.exists():
                disk.unlink()
                removed.append(str(disk))
        note = "" if dom is not None else "no such domain"
        return Deleted(VmState.MISSING, changed or bool(removed), note, disks_removed=tuple(removed))

    # -- resources ----------------------------------------------------------------------

    def set_resources(self, domain: str, *, memory_mib: int | None, vcpus: int | None) -> Resized:
        """The definition always; the running VM where libvirt can. What the running VM has is read back
        from libvirt afterwards: only that is reported live (a balloon request the guest ignores is not)."""
        if (memory_mib is not None and memory_mib <= 0) or (vcpus is not None and vcpus <= 0):
            raise InvalidInput(f"cannot resize {domain}: memory and vcpus must be positive")
        dom = self._require(domain)
        notes: list[str] = []
        ballooned = False
        config, live_flag = libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_AFFECT_LIVE
        with translate(domain, "resize"):
            old_mem, old_max_mem, old_vcpus, old_max_vcpus = domxml.parse_resources(self._config(dom))
            active = bool(dom.isActive())
            was_live = (_live_mib(dom), int(dom.vcpusFlags(live_flag))) if active else None
            if memory_mib is not None and (memory_mib, memory_mib) != (old_mem, old_max_mem):
                # Maximum first: that also clamps current memory, and the next boot gets exactly this much.
                dom.setMemoryFlags(memory_mib * 1024, config | libvirt.VIR_DOMAIN_MEM_MAXIMUM)
                dom.setMemoryFlags(memory_mib * 1024, config)
            if vcpus is not None and vcpus != old_vcpus:
                # The maximum only grows (never below what is asked): it is the room for hot-plugging
                # vCPUs into the running guest later. The current count may never exceed it.
                if vcpus > old_max_vcpus:
                    dom.setVcpusFlags(vcpus, config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
                dom.setVcpusFlags(vcpus, config)
            if active and memory_mib is not None and _live_mib(dom) != memory_mib:
                live_max = int(dom.maxMemory()) // 1024
                if memory_mib > live_max:  # the balloon can only give back what QEMU was started with
                    notes.append(f"memory applies at the next boot (the running VM's maximum is {live_max} MiB)")
                else:
                    ballooned = _try_live(notes, "memory", lambda: dom.setMemoryFlags(memory_mib * 1024, live_flag))
            if active and vcpus is not None and int(dom.vcpusFlags(live_flag)) != vcpus:
                live_max_vcpus = int(dom.vcpusFlags(live_flag | libvirt.VIR_DOMAIN_VCPU_MAXIMUM))
                if vcpus > live_max_vcpus:  # hot-plug only up to the maximum QEMU was started with
                    notes.append(f"vcpus applies at the next boot (the running VM's maximum is {live_max_vcpus})")
                else:
                    _try_live(notes, "vcpus", lambda: dom.setVcpusFlags(vcpus, live_flag))
            new_mem, _, new_vcpus, _ = domxml.parse_resources(self._config(dom))
            now_live = None
            if active:
                # the balloon is the guest's to inflate: libvirt reports what it gave back once it did
                live_mem = _settled_mib(dom, new_mem) if ballooned else _live_mib(dom)
                if ballooned and live_mem != new_mem:
                    notes.append(f"memory applies at the next boot (the running guest still has {live_mem} MiB: "
                                 "its balloon driver did not act on the request)")
                now_live = (live_mem, int(dom.vcpusFlags(live_flag)))
        changed = (new_mem, new_vcpus) != (old_mem, old_vcpus) or now_live != was_live
        return Resized(state_of(dom), changed, "; ".join(notes), memory_mib=new_mem, vcpus=new_vcpus,
                       live=now_live == (new_mem, new_vcpus),
                       memory_mib_live=now_live[0] if now_live else None,
                       vcpus_live=now_live[1] if now_live else None)
