"""The driver's disks and snapshots: the qcow2 disk vmorch creates for a VM (qemu-img), and
internal snapshots, taken and reverted idempotently."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import libvirt

from orchestrator.model.errors import AlreadyExists, HypervisorError, InvalidInput, NotFound

from . import domxml
from .libvirtconn import INSTALL_HINT, LibvirtConnection, state_of, translate, vmorch_error
from .results import Reverted, Snapshotted


def qemu_img(*args: str) -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise HypervisorError("qemu-img is not installed on this host", hint=INSTALL_HINT)
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def create_disk(path: Path, size_gib: int, image: str | None) -> None:
    """A qcow2 of ``size_gib`` at ``path``, on ``image`` as its backing file if given (and at least its size)."""
    size = size_gib * 1024**3
    args = ["create", "-q", "-f", "qcow2"]
    if image:
        if not Path(image).is_file():
            raise InvalidInput(f"image {image} does not exist on this host")
        # -U: the image may be open in a running VM; we only read its format and size.
        info = json.loads(qemu_img("info", "-U", "--output=json", image))
        args += ["-b", image, "-F", str(info["format"])]
        size = max(size, int(info.get("virtual-size", 0)))
    # A leftover from a launch that died before defining the domain: nobody uses it.
    path.unlink(missing_ok=True)
    qemu_img(*args, str(path), str(size))


class Snapshots(LibvirtConnection):
    """Internal snapshots (in the VM's qcow2; their metadata in libvirt)."""

    def _snapshot(self, dom: libvirt.virDomain, domain: str, name: str) -> libvirt.virDomainSnapshot | None:
        try:
            return dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise vmorch_error(exc, domain, "look up snapshots of") from exc

    def snapshot(self, domain: str, name: str, *, job_id: int) -> Snapshotted:
        dom = self._require(domain)
        description = domxml.job_description(job_id)
        existing = self._snapshot(dom, domain, name)
        with translate(domain, "snapshot"):
            if existing is not None:
                if domxml.parse_description(existing.getXMLDesc(0)) != description:
                    raise AlreadyExists(f"{domain} already has a snapshot named {name!r}", hint="pick another name")
                return Snapshotted(state_of(dom), False, "already taken", snapshot=name)
            dom.snapshotCreateXML(domxml.snapshot_xml(name, description), 0)
            return Snapshotted(state_of(dom), True, snapshot=name)

    def revert(self, domain: str, name: str) -> Reverted:
        dom = self._require(domain)
        snap = self._snapshot(dom, domain, name)
        if snap is None:
            raise NotFound(f"{domain} has no snapshot named {name!r}")
        meta = self._meta(dom, domain)
        with translate(domain, "revert"):
            dom.revertToSnapshot(snap, 0)
        # Reverting restores the whole definition, <metadata> included; vmorch's tags, fence
        # and job id describe the VM's management, not its contents, so they must survive.
        if self._meta(dom, domain) != meta:
            self._write_meta(dom, domain, meta)
        status = self._status_of(dom)
        return Reverted(status.state, True, snapshot=name, memory_mib=status.memory_mib, vcpus=status.vcpus)
