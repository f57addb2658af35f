"""The guest's boot disk: a FAT "superfloppy" made bootable by ``syslinux --install`` that holds the
kernel and the initramfs, converted to qcow2.
"""

from __future__ import annotations

import os
from pathlib import Path

from .guestinitramfs import _initramfs
from .guestpackages import _extract, _Plan
from .guesttools import GuestImageError, _run

KERNEL_CMDLINE = "console=ttyS0,115200 quiet scsi_mod.scan=sync mitigations=off tsc=reliable no_timer_check"


def _syslinux_cfg() -> bytes:
    return (
        "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT vmorch\n"
        f"LABEL vmorch\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  APPEND {KERNEL_CMDLINE}\n"
    ).encode()


def _assemble(plan: _Plan, debs: dict[str, Path], tmp: Path) -> Path:
    root = _extract(plan, debs, tmp)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestImageError(f"{plan.kernel} has no /boot/vmlinuz-*")
    kver = kernels[0].name[len("vmlinuz-"):]
    initrd = _initramfs(root, kver)

    boot = tmp / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(kernels[0].read_bytes())
    (boot / "initrd.gz").write_bytes(initrd)
    (boot / "syslinux.cfg").write_bytes(_syslinux_cfg())
    payload = sum(p.stat().st_size for p in boot.iterdir())
    size_mib = max(16, payload // (1 << 20) + 4)
    raw = tmp / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(size_mib << 20)
    mtools_env = {"MTOOLS_SKIP_CHECK": "1"}
    _run(["mkfs.vfat", "-n", "VMORCHBOOT", "-i", "766d6f72", str(raw)])
    for p in sorted(boot.iterdir()):
        _run(["mcopy", "-i", str(raw), "-o", str(p), f"::{p.name}"], env=mtools_env)
    _run(["syslinux", "--install", str(raw)], env=mtools_env)
    out = tmp / "guest.qcow2"
    _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    os.chmod(out, 0o644)
    return out
