"""The driver's side of ``vm move``: export a shut-off domain, import it on another host, or
live-migrate a running one to another libvirtd.

A VM's cloud-init seed goes along inside the exported definition (gzipped, a few KB: a seed is
mostly ISO 9660 padding), and lands in the target's VM-disk store under the target's name for it;
the move-out deletes it on the source with the domain. The catalog image stays where it is: a move
to a host where it is not ready is refused before it is accepted (``control.submit``).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path

import libvirt

from orchestrator.model.errors import InvalidState
from orchestrator.model.records import VmState

from . import cloudinit, domxml
from .disks import DiskStore
from .libvirtconn import state_of, translate
from .results import DriverResult, Imported


class Moving(DiskStore):
    def export(self, domain: str) -> tuple[str, Path | None]:
        """The definition of a shut-off domain and the disk vmorch created for it (``vm move``)."""
        dom = self._require(domain)
        with translate(domain, "export"):
            state = state_of(dom)
            if dom.isActive():
                raise InvalidState(f"cannot move {domain}: it is {state.value}; only a shut-off VM moves",
                                   hint="stop it first ('vmorch vm stop NAME --force'); live moves need libvirtd")
            if dom.snapshotNum(0):
                raise InvalidState(f"cannot move {domain}: it has snapshots, which don't move with it",
                                   hint="moving a VM with snapshots is not supported")
            xml = self._config(dom)
        meta = domxml.parse_metadata(xml)
        # only the disk vmorch made for this domain (its store's name for it, or the name of before)
        own = (str(self.disk_path(domain)), str(self.storage_dir / f"{domain}.qcow2"))
        disk = Path(meta.disk) if meta and meta.disk in own else None
        seed = self.seed_path(domain)
        if str(seed) in domxml.sources_of(xml) and seed.is_file():
            xml = cloudinit.with_seed(xml, seed.read_bytes())
        return xml, disk if disk is not None and disk.exists() else None

    def import_domain(self, domain: str, xml: str, disk: Path | None) -> DriverResult:
        """Define a domain exported by another host; its disk is already at ``disk``. Idempotent."""
        existing = self._lookup(domain)
        if existing is not None:
            return DriverResult(state_of(existing), False, "already here")
        meta = domxml.parse_metadata(xml)
        if meta is None:
            raise InvalidState(f"cannot import {domain}: the definition has no vmorch metadata")
        if disk is not None and meta.disk:
            xml = domxml.relocate_disk(xml, meta.disk, str(disk))
        xml, seed = cloudinit.take_seed(xml)
        if seed is not None:
            old = next((s for s in domxml.sources_of(xml) if s.endswith(".seed.iso")), None)
            if old is not None:
                xml = domxml.relocate_disk(xml, old, str(self._write_seed(domain, seed)))
        with translate(domain, "import"):
            dom = self.conn.defineXML(xml)
        if disk is not None:
            self._write_meta(dom, domain, replace(meta, disk=str(disk)))
        return Imported(state_of(dom), True, disk=str(disk) if disk else None)

    def _write_seed(self, domain: str, content: bytes) -> Path:
        path = self.seed_path(domain)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        tmp.write_bytes(content)
        tmp.chmod(0o444)
        os.replace(tmp, path)
        return path

    def migrate_live(self, domain: str, dest_uri: str, *, shared_storage: bool) -> DriverResult:
        """Live-migrate a running domain to the libvirtd at ``dest_uri`` (peer to peer), keeping it defined there.

        The disk stays where it is: both hosts must see it at the same path. libvirt refuses what it
        can't tell is shared; ``shared_storage`` is the operator's word that it is (VIR_MIGRATE_UNSAFE).
        """
        dom = self._require(domain)
        with translate(domain, "live-migrate"):
            if not dom.isActive():
                raise InvalidState(f"cannot live-migrate {domain}: it is {state_of(dom).value}",
                                   hint="move it without --live")
            if dom.snapshotNum(0):
                raise InvalidState(f"cannot move {domain}: it has snapshots, which don't move with it")
            flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                     | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
            if shared_storage:
                flags |= libvirt.VIR_MIGRATE_UNSAFE
            dom.migrateToURI3(dest_uri, {}, flags)
        return DriverResult(VmState.RUNNING, True, f"live-migrated to {dest_uri}")
