"""The driver's disks and snapshots: the host's VM-disk store, the qcow2 disk vmorch creates for a
VM (qemu-img), and internal snapshots, taken and reverted idempotently.

A host's storage directory holds two stores: ``images/`` (catalog images, ``worker.images``) and
``vms/``, each VM's disk and cloud-init seed: ``<id>.qcow2`` and ``<id>.seed.iso``, where ``<id>``
is 128 bits of an HMAC of the domain's name under a key of the host's own (``vms/.key``): stable
for a domain (a redelivered launch and a delete find its files), not guessable from its name. A
disk's only backing file is an image of ``images/`` (``create_disk`` refuses anything else), named
by its absolute path, with its format given (``-F qcow2``): qemu-img and QEMU never probe it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import libvirt

from orchestrator.control.placement import GIB, no_store_room
from orchestrator.model.errors import AlreadyExists, HypervisorError, InvalidInput, NoCapacity, NotFound
from orchestrator.model.records import VmState

from . import domxml
from .libvirtconn import INSTALL_HINT, LibvirtConnection, state_of, translate, vmorch_error
from .results import Reverted, Snapshotted

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
VMS_DIR = "vms"
_KEY = ".key"


@dataclass
class StoreRoom:
    """Which host this process's store is, and the room a disk leaves free beyond its size (GiB):
    set once by the worker at start (``worker.main``), as its settings say."""
    host: str = ""
    margin_gib: float = 1.0


STORE_ROOM = StoreRoom()


def check_room(store: Path, size_bytes: int) -> None:
    """Refuse a disk the store has no room for (full size plus the margin): placement checked the
    host's last heartbeat; this is the last word, right before the disk is made."""
    free = shutil.disk_usage(store).free
    if free < size_bytes + STORE_ROOM.margin_gib * GIB:
        raise NoCapacity(no_store_room(STORE_ROOM.host or "this host", free, -(-size_bytes // GIB),
                                       STORE_ROOM.margin_gib),
                         hint="ask for a smaller disk (--disk), free space in the host's store, or add a host")


def qemu_img(*args: str) -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise HypervisorError("qemu-img is not installed on this host", hint=INSTALL_HINT)
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def create_disk(path: Path, size_gib: int, image: str | None) -> None:
    """A qcow2 of ``size_gib`` at ``path``, on ``image`` as its backing file if given (and at least its size).

    ``image`` must be a file of the image store beside ``path``'s store (``<storage>/images/``) and
    standalone: nothing from outside the stores becomes part of a VM's disk.
    """
    size = size_gib * 1024**3
    args = ["create", "-q", "-f", "qcow2"]
    if image:
        backing = store_image(path.parent.parent / IMAGES_DIR, image)
        # -U: the image may be open in running VMs; we only read its size. Its chain is itself alone.
        chain = json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", str(backing)))
        if len(chain) != 1 or chain[0].get("backing-filename"):
            raise InvalidInput(f"image {backing.name} is not standalone", hint="remove it and import it again")
        args += ["-b", str(backing), "-F", "qcow2"]
        size = max(size, int(chain[0].get("virtual-size", 0)))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A leftover from a launch that died before defining the domain: nobody uses it.
    path.unlink(missing_ok=True)
    check_room(path.parent, size)
    qemu_img(*args, str(path), str(size))


def qcow2_snapshot_sizes(disk: Path) -> dict[str, int]:
    """Each internal snapshot in the qcow2 ``disk``, by name: its ``vm-state-size``, the bytes of
    guest state it saved (RAM and devices, as QEMU's migration stream wrote them: a running VM's,
    0 for a snapshot of a VM that was off). The disk clusters it keeps are not in the number: qcow2
    shares them with the live disk and the other snapshots and does not count them apart.

    ``-U``: QEMU holds the disk open while the VM runs; only the header and the snapshot table are read.
    """
    info = json.loads(qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(disk)))
    return {str(s["name"]): int(s.get("vm-state-size", 0)) for s in info.get("snapshots", [])}


def store_image(images: Path, image: str) -> Path:
    """``image`` if it is a regular file directly in the image store ``images``; else a refusal."""
    given = Path(image)
    if given.parent != images or not given.name.endswith(".qcow2") or given.is_symlink() or not given.is_file():
        raise InvalidInput(f"image {image} is not in this host's image store ({images})",
                           hint="launch from a catalog image ('vmorch image list')")
    return given


class DiskStore(LibvirtConnection):
    """Where a VM's disk and seed live on this host (see the module)."""

    @property
    def images_dir(self) -> Path:
        return self.storage_dir / IMAGES_DIR

    @property
    def vms_dir(self) -> Path:
        return self.storage_dir / VMS_DIR

    def disk_path(self, domain: str) -> Path:
        """Where vmorch keeps the disk it creates for ``domain``: stable, and not guessable from the name."""
        return self.vms_dir / f"{self._file_id(domain)}.qcow2"

    def seed_path(self, domain: str) -> Path:
        return domxml.seed_for(self.disk_path(domain))

    def _file_id(self, domain: str) -> str:
        return hmac.new(self._host_key(), domain.encode(), hashlib.sha256).hexdigest()[:32]

    _vms_key: bytes | None = None

    def _host_key(self) -> bytes:
        """The host's key, made once (written whole, then linked into place: a reader sees all of it)."""
        if self._vms_key is None:
            path = self.vms_dir / _KEY
            if not path.exists():
                self.vms_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = self.vms_dir / f".key-{secrets.token_hex(8)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass  # another thread made it first: use that one
                finally:
                    tmp.unlink()
            key = path.read_bytes()
            if len(key) != 32:
                raise HypervisorError(f"{path} is not a 32-byte key", hint="delete it if no VM has a disk here")
            self._vms_key = key
        return self._vms_key


class Snapshots(DiskStore):
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

    def delete_snapshot(self, domain: str, name: str) -> Snapshotted:
        """Delete a snapshot; one already gone (a redelivered job) is changed=False."""
        dom = self._require(domain)
        snap = self._snapshot(dom, domain, name)
        if snap is None:
            return Snapshotted(state_of(dom), False, "no such snapshot (already deleted)", snapshot=name)
        with translate(domain, "delete a snapshot of"):
            snap.delete(0)
        return Snapshotted(state_of(dom), True, snapshot=name)

    def snapshot_details(self, domain: str) -> list[dict[str, object]]:
        """Each snapshot's name, when it was taken (epoch seconds) and its size: the guest state it
        saved in the VM's qcow2 (``qcow2_snapshot_sizes``).

        The size is None where no file holds the snapshot: on libvirt's test driver a snapshot is
        libvirt's metadata only (no QEMU writes it into the VM's qcow2, even where the VM has one),
        and a VM without a disk has no qcow2 at all. A size that can't be read (qemu-img missing or
        failing) is None too: the snapshot itself was taken all the same.
        """
        dom = self._require(domain)
        out: list[dict[str, object]] = []
        with translate(domain, "list snapshots of"):
            for snap in dom.listAllSnapshots(0):
                created = ElementTree.fromstring(snap.getXMLDesc(0)).findtext("creationTime")
                out.append({"name": snap.getName(), "created_at": float(created) if created else None})
        sizes: dict[str, int] = {}
        disk = self.disk_path(domain)
        if out and disk.is_file():
            try:
                sizes = qcow2_snapshot_sizes(disk)
            except (HypervisorError, ValueError, KeyError, TypeError) as exc:
                log.warning("cannot read the snapshot sizes of %s from %s: %s", domain, disk, exc)
        for s in out:
            s["size_bytes"] = sizes.get(str(s["name"]))
        return sorted(out, key=lambda s: str(s["name"]))

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
        live: tuple[int | None, int | None] = (None, None)
        if status.state in (VmState.RUNNING, VmState.PAUSED):
            with translate(domain, "inspect"):  # the guest restored with it, as libvirt runs it now
                mib, vcpus = int(dom.info()[2]) // 1024, int(dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE))
            live = (mib if mib != status.memory_mib else None, vcpus if vcpus != status.vcpus else None)
        return Reverted(status.state, True, snapshot=name, memory_mib=status.memory_mib, vcpus=status.vcpus,
                        memory_mib_live=live[0], vcpus_live=live[1])
