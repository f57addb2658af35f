"""The guest's initramfs, the whole system: busybox, qemu-ga with the shared libraries it needs (read
from the ELF ``DT_NEEDED`` entries), the kernel modules with their dependencies (read from each
module's ``.modinfo``), and the guest's files (``guestfiles``), as a gzipped "newc" cpio archive.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from .guestfiles import _INIT, _INITTAB, _OS_RELEASE, _PORTS, _PROFILE, _QGA, _UDHCPC, AGENT_CHANNEL, BOOT_MARKER
from .guesttools import GuestImageError, _run

#: loaded first, in this order: the power button must work as early as possible
EARLY_MODULES = ("evdev", "button")
#: then these (with their dependencies first)
MODULES = (
    "virtio_pci", "virtio_console", "virtio_net", "virtio_blk", "virtio_balloon",
    "sr_mod", "cdrom", "ata_piix", "ahci", "isofs",
)

_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib")


# --------------------------------------------------------------------------- ELF reading


def _elf_sections(data: bytes) -> dict[str, tuple[int, int, int, int]]:
    """name -> (type, offset, size, link) of an ELF64 little-endian file's sections."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestImageError("not an ELF64 little-endian file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = raw[shstrndx][4]
    out: dict[str, tuple[int, int, int, int]] = {}
    for name_off, sh_type, _flags, _addr, off, size, link, _info in raw:
        end = data.index(b"\0", strtab_off + name_off)
        out[data[strtab_off + name_off:end].decode()] = (sh_type, off, size, link)
    return out


def _elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED sonames of an ELF64 file."""
    sections = _elf_sections(data)
    if ".dynamic" not in sections:
        return []
    _t, off, size, _link = sections[".dynamic"]
    _t, str_off, _s, _l = sections[".dynstr"]
    needed = []
    for i in range(0, size, 16):
        tag, val = struct.unpack_from("<qQ", data, off + i)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            needed.append(data[str_off + val:data.index(b"\0", str_off + val)].decode())
    return needed


def _elf_interp(data: bytes) -> str | None:
    sections = _elf_sections(data)
    if ".interp" not in sections:
        return None
    _t, off, size, _link = sections[".interp"]
    return data[off:off + size].rstrip(b"\0").decode()


def _modinfo_depends(data: bytes) -> list[str]:
    _t, off, size, _link = _elf_sections(data)[".modinfo"]
    for item in data[off:off + size].split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[len(b"depends="):].decode().split(",") if d]
    return []


# --------------------------------------------------------------------------- cpio (newc)


class _Cpio:
    """An initramfs archive in the kernel's "newc" format, built in memory (no root needed)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 0
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        self._buf.write(b"070701" + b"".join(b"%08x" % f for f in fields) + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if path and path not in self._seen:
            self._parents(path)
            self._seen.add(path)
            self._entry(path, stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self._seen.add(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self._seen.add(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self._seen.add(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self._buf.write(b"\0" * (-self._buf.tell() % 512))
        return self._buf.getvalue()


# --------------------------------------------------------------------------- the initramfs


def _find_in_root(root: Path, rel: str) -> Path:
    """Resolve ``rel`` (absolute inside ``root``) through symlinks that stay inside ``root``."""
    path = root / rel.lstrip("/")
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise GuestImageError(f"symlink loop at {rel}")


def _add_libraries(cpio: _Cpio, root: Path, binary: bytes) -> None:
    interp = _elf_interp(binary)
    todo = list(_elf_needed(binary))
    done: set[str] = set()
    while todo:
        soname = todo.pop()
        if soname in done:
            continue
        done.add(soname)
        for d in _LIB_DIRS:
            cand = _find_in_root(root, f"{d}/{soname}")
            if cand.is_file():
                data = cand.read_bytes()
                cpio.file(f"lib/x86_64-linux-gnu/{soname}", data, 0o755)
                todo.extend(_elf_needed(data))
                break
        else:
            raise GuestImageError(f"shared library {soname} (needed by qemu-ga) is in none of the Debian packages")
    if interp:
        name = interp.rsplit("/", 1)[-1]
        if name not in done:
            cpio.file(f"lib/x86_64-linux-gnu/{name}", _find_in_root(root, interp).read_bytes(), 0o755)
        if interp != f"/lib/x86_64-linux-gnu/{name}":
            cpio.symlink(interp, f"/lib/x86_64-linux-gnu/{name}")


def _module_order(moddir: Path, wanted: Iterable[str], builtin: set[str], done: set[str]) -> list[str]:
    """Module names to insmod, dependencies first, skipping built-in and already-listed ones."""
    files = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in stack:
            raise GuestImageError(f"kernel module dependency cycle: {' -> '.join((*stack, name))}")
        if name not in files:
            raise GuestImageError(f"kernel module {name} is neither built in nor shipped by the kernel package")
        for dep in _modinfo_depends(files[name].read_bytes()):
            visit(dep, (*stack, name))
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _initramfs(root: Path, kver: str) -> bytes:
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root",
              "var/log", "var/lib/qemu-ga", "mnt/cidata", "lib64"):
        cpio.dir(d)
    cpio.dir("tmp", 0o1777)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.chardev("dev/ttyS0", 4, 64)

    busybox = root / "bin/busybox"
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _run([str(busybox), "--list-full"]).split():
        if applet.rsplit("/", 1)[-1] != "busybox":
            cpio.symlink(applet, "/bin/busybox")

    agent = _find_in_root(root, "usr/sbin/qemu-ga").read_bytes()
    cpio.file("usr/sbin/qemu-ga", agent, 0o755)
    _add_libraries(cpio, root, agent)

    moddir = root / "lib/modules" / kver
    builtin_file = moddir / "modules.builtin"
    builtin = {Path(line).name[:-3].replace("-", "_") for line in builtin_file.read_text().split()}
    done: set[str] = set()
    early = _module_order(moddir, EARLY_MODULES, builtin, done)
    rest = _module_order(moddir, MODULES, builtin, done)
    files = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    for name in (*early, *rest):
        cpio.file(f"lib/modules/{kver}/{name}.ko", files[name].read_bytes())
    cpio.file("etc/modules.early", ("\n".join(early) + "\n").encode())
    cpio.file("etc/modules.load", ("\n".join(rest) + "\n").encode())

    cpio.file("init", _INIT.replace("@MARKER@", BOOT_MARKER).encode(), 0o755)
    cpio.file("etc/inittab", _INITTAB.encode())
    cpio.file("sbin/vmorch-ports", _PORTS.encode(), 0o755)
    cpio.file("sbin/vmorch-qga", _QGA.replace("@CHANNEL@", AGENT_CHANNEL).encode(), 0o755)
    cpio.file("etc/udhcpc.script", _UDHCPC.encode(), 0o755)
    cpio.file("etc/acpi/PWRF/00000080", b"#!/bin/sh\nexec poweroff\n", 0o755)
    cpio.file("etc/profile", _PROFILE.encode())
    cpio.file("etc/os-release", _OS_RELEASE.encode())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/hosts", b"127.0.0.1 localhost\n")
    cpio.file("etc/resolv.conf", b"")
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)
