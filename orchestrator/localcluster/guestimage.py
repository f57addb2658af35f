"""A small bootable Linux test guest, built from Debian 12 packages in seconds and cached.

``build()`` returns the path of a qcow2 disk that boots under SeaBIOS with nothing given
by libvirt (no ``<kernel>``/``<initrd>``): a FAT "superfloppy" made bootable by
``syslinux --install`` holds Debian's kernel and an initramfs that is the whole system:

* ``busybox-static`` (shell, init, udhcpc, acpid, ip, ping, free, ...),
* ``qemu-guest-agent`` with the shared libraries it needs (taken from the Debian library
  packages it depends on, resolved by reading the ELF ``DT_NEEDED`` entries),
* the kernel modules the guest needs (virtio, the CD-ROM stack, the ACPI power button),
  with their dependencies read from each module's ``.modinfo``.

The packages are fetched with ``apt-get download`` into the cache and unpacked with
``dpkg-deb -x``; nothing is installed on the host. The guest's ``/init``:

1. mounts proc, sys, devtmpfs; loads ``evdev`` + ``button`` and starts ``acpid`` first, so
   the ACPI power button powers the guest off as early as possible (a press counted by
   the kernel before acpid listened powers off too). A press *before* the kernel has
   loaded ``button`` (firmware, boot loader, kernel boot: ~6 s under TCG, well under 1 s
   under KVM) is dropped by QEMU itself, which latches the button only once the guest
   enabled it; so whoever shuts a guest down presses again until it is off;
2. loads the other modules, creates ``/dev/virtio-ports/<name>`` links, mounts a CD-ROM
   labelled ``cidata`` (iso9660) read-only at ``/mnt/cidata`` (its ``meta-data``
   ``local-hostname`` sets the hostname), brings up ``lo`` and runs ``udhcpc`` on every
   ``eth*`` in the background (5 discovers 2 s apart, then a 10 s pause, round after
   round, so a network that comes later is still picked up);
3. prints :data:`BOOT_MARKER` on the serial console and becomes busybox ``init``, which
   keeps a root shell on ``ttyS0`` and ``qemu-ga`` on ``org.qemu.guest_agent.0``
   (all commands allowed, guest-exec and guest-file-* included) respawned; ``poweroff``
   and ``reboot`` in the guest really power off and reboot.

The image is cached under the cache directory keyed by the package versions and a hash of
the builder's source (the recipe): every ``guest*.py`` module of this package, so a change in
any of them rebuilds the image (a new module of the builder must be named ``guest*.py`` too).
Concurrent builders serialize on an ``fcntl`` lock and publish with ``os.replace``, so
several test processes can call :func:`build` at once.

The builder's modules: this one (the cache and :func:`build`), ``guesttools`` (host tools,
``GuestImageError``), ``guestpackages`` (resolving, fetching and unpacking the packages; the
recipe hash), ``guestfiles`` (``/init`` and the guest's other files), ``guestinitramfs``
(ELF and cpio, the initramfs) and ``guestdisk`` (the bootable disk).

Host tools (Debian packages): apt, dpkg, dosfstools, mtools, syslinux, qemu-utils.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .guestdisk import _assemble
from .guestfiles import AGENT_CHANNEL, BOOT_MARKER
from .guestpackages import _download, _resolve
from .guesttools import HOST_TOOLS as HOST_TOOLS
from .guesttools import GuestImageError, _check_tools

__all__ = ["AGENT_CHANNEL", "BOOT_MARKER", "CACHE_ENV", "DEFAULT_CACHE_DIR", "GuestImageError", "build", "main"]

DEFAULT_CACHE_DIR = Path("/var/cache/vmorch/guest-image")
CACHE_ENV = "VMORCH_GUEST_IMAGE_CACHE"


# --------------------------------------------------------------------------- cache + API


def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is None:
        env = os.environ.get(CACHE_ENV)
        cache_dir = Path(env) if env else DEFAULT_CACHE_DIR
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        (cache_dir / "images").mkdir(exist_ok=True, mode=0o755)
    except OSError as exc:
        raise GuestImageError(f"cannot create the guest image cache {cache_dir} ({exc.strerror}); "
                              f"set {CACHE_ENV} to a writable directory") from exc
    return cache_dir


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(cache_dir: Path | None = None) -> Path:
    """Return the path of the bootable qcow2 test guest, building it on first use.

    ``cache_dir`` defaults to ``$VMORCH_GUEST_IMAGE_CACHE`` or ``/var/cache/vmorch/guest-image``.
    Treat the returned file as read-only: boot copy-on-write overlays of it.
    """
    cache = _cache_dir(cache_dir)
    _check_tools()
    plan = _resolve(cache)
    image = cache / "images" / f"guest-{plan.key()}.qcow2"
    if image.is_file():
        return image
    with _locked(cache / ".lock"):
        if image.is_file():
            return image
        for stale in cache.glob(".build-*"):  # left by a builder that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            debs = _download(plan, cache / "debs", Path(tmp))
            built = _assemble(plan, debs, Path(tmp))
            os.replace(built, image)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.localcluster.guestimage",
                                     description="Build (or find in the cache) the vmorch test guest image and "
                                                 "print its path.")
    parser.add_argument("--out", type=Path, help="also copy the image to this path and print that path")
    parser.add_argument("--cache-dir", type=Path, help=f"cache directory (default ${CACHE_ENV} or {DEFAULT_CACHE_DIR})")
    args = parser.parse_args(argv)
    try:
        image = build(args.cache_dir)
    except GuestImageError as exc:
        print(f"guestimage: {exc}", file=sys.stderr)
        return 1
    if args.out is not None:
        out: Path = args.out.resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.copyfile(image, tmp)
        os.replace(tmp, out)
        image = out
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
