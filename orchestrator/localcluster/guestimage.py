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
this file (the recipe). Concurrent builders serialize on an ``fcntl`` lock and publish
with ``os.replace``, so several test processes can call :func:`build` at once.

Host tools (Debian packages): apt, dpkg, dosfstools, mtools, syslinux, qemu-utils.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AGENT_CHANNEL", "BOOT_MARKER", "CACHE_ENV", "DEFAULT_CACHE_DIR", "GuestImageError", "build", "main"]

#: the line the guest prints on its serial console once it is up
BOOT_MARKER = "vmorch-guest: ready"
#: the virtio-serial port name qemu-ga listens on
AGENT_CHANNEL = "org.qemu.guest_agent.0"
DEFAULT_CACHE_DIR = Path("/var/cache/vmorch/guest-image")
CACHE_ENV = "VMORCH_GUEST_IMAGE_CACHE"

KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
AGENT = "qemu-guest-agent"
KERNEL_CMDLINE = "console=ttyS0,115200 quiet scsi_mod.scan=sync mitigations=off tsc=reliable no_timer_check"

#: loaded first, in this order: the power button must work as early as possible
EARLY_MODULES = ("evdev", "button")
#: then these (with their dependencies first)
MODULES = (
    "virtio_pci", "virtio_console", "virtio_net", "virtio_blk", "virtio_balloon",
    "sr_mod", "cdrom", "ata_piix", "ahci", "isofs",
)

#: host tool -> the Debian package that provides it
HOST_TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
    "qemu-img": "qemu-utils",
}

_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib")
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class GuestImageError(RuntimeError):
    """The image cannot be built; the message says why in one line."""


# --------------------------------------------------------------------------- guest files

_INIT = r"""#!/bin/sh
# vmorch test guest: everything runs from this initramfs.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# until busybox init takes over as PID 1, honour poweroff/reboot/halt ourselves
trap 'poweroff -f' USR2
trap 'reboot -f' TERM
trap 'halt -f' USR1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/virtio-ports /run /tmp /var/log /var/lib/qemu-ga /mnt/cidata
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
ln -sfn /run /var/run
ln -sfn /proc/self/fd /dev/fd
KMOD=/lib/modules/$(uname -r)
load() { for m in "$@"; do insmod "$KMOD/$m.ko" 2>/dev/null; done; }
# the ACPI power button first: acpid runs /etc/acpi/PWRF/00000080 (poweroff)
load $(cat /etc/modules.early)
acpid -l /dev/null -p /run/acpid.pid
i=0
while [ "$i" -lt 50 ]; do
    pid=$(cat /run/acpid.pid 2>/dev/null)
    [ -n "$pid" ] && ls -l "/proc/$pid/fd" 2>/dev/null | grep -q /dev/input/event && break
    i=$((i + 1))
    sleep 0.02
done
# a press between loading the driver and acpid listening is only counted: act on it
read -r presses _ </sys/firmware/acpi/interrupts/ff_pwr_btn 2>/dev/null
[ "${presses:-0}" -gt 0 ] && poweroff
load $(cat /etc/modules.load)
hostname vmorch-guest
/sbin/vmorch-ports
# a CD-ROM labelled cidata (cloud-init NoCloud), read-only
i=0
while :; do
    dev=$(findfs LABEL=cidata 2>/dev/null) && break
    ls /sys/class/block/ 2>/dev/null | grep -q '^sr' || break
    i=$((i + 1)); [ "$i" -ge 20 ] && break
    sleep 0.1
done
if [ -n "$dev" ] && mount -t iso9660 -o ro "$dev" /mnt/cidata; then
    h=$(sed -n 's/^local-hostname:[[:space:]]*//p' /mnt/cidata/meta-data 2>/dev/null | tr -d "\"' \r")
    [ -n "$h" ] && hostname "$h"
fi
ip link set lo up
for d in /sys/class/net/eth*; do
    [ -e "$d" ] || continue
    n=${d##*/}
    ip link set "$n" up
    # 5 discovers 2 s apart, then a 10 s pause, round after round, in the background
    udhcpc -f -i "$n" -t 5 -T 2 -A 10 -s /etc/udhcpc.script -p "/run/udhcpc.$n.pid" \
        -x "hostname:$(hostname)" >"/run/udhcpc.$n.log" 2>&1 &
done
echo "@MARKER@ (kernel $(uname -r))" >/dev/console
exec /sbin/init
"""

_INITTAB = """\
::respawn:/sbin/vmorch-qga
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sh -c 'sync; umount -a -r 2>/dev/null; true'
"""

_PORTS = r"""#!/bin/sh
# /dev/virtio-ports/<name> links (no udev here); names arrive from the host shortly after probe
mkdir -p /dev/virtio-ports
i=0
while [ "$i" -lt 30 ]; do
    missing=0
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p" ] || continue
        name=$(cat "$p/name" 2>/dev/null)
        if [ -z "$name" ]; then missing=1; continue; fi
        ln -sfn "/dev/${p##*/}" "/dev/virtio-ports/$name"
    done
    [ "$missing" = 0 ] && exit 0
    i=$((i + 1))
    sleep 0.1
done
"""

_QGA = r"""#!/bin/sh
# respawned by init: wait for the agent's port, then run qemu-ga in the foreground
PORT=/dev/virtio-ports/@CHANNEL@
while [ ! -e "$PORT" ]; do
    sleep 5
    /sbin/vmorch-ports
done
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
exec /usr/sbin/qemu-ga -m virtio-serial -p "$PORT" -t /var/lib/qemu-ga -l /var/log/qemu-ga.log
"""

_UDHCPC = r"""#!/bin/sh
# udhcpc event script: address, default route, DNS
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    cur=$(ip -4 -o addr show dev "$interface" | sed -n 's/.* inet \([0-9.]*\/[0-9]*\).*/\1/p')
    if [ "$cur" != "$ip/${mask:-24}" ]; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    fi
    if [ -n "$router" ]; then
        for r in $router; do
            ip route replace default via "$r" dev "$interface" && break
        done
    fi
    if [ -n "$dns" ]; then
        : >/etc/resolv.conf
        for s in $dns; do echo "nameserver $s" >>/etc/resolv.conf; done
    fi
    ;;
esac
exit 0
"""

_PROFILE = """\
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='\\h# '
"""

_OS_RELEASE = """\
NAME="vmorch test guest"
ID=vmorch-guest
ID_LIKE=debian
VERSION_ID="12"
PRETTY_NAME="vmorch test guest (Debian 12 kernel, busybox)"
"""


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


# --------------------------------------------------------------------------- host commands


def _which(tool: str) -> str:
    found = shutil.which(tool, path=_TOOL_PATH)
    if found is None:
        pkg = HOST_TOOLS.get(tool, tool)
        raise GuestImageError(f"host tool {tool!r} is missing: install the Debian package {pkg} "
                              f"(apt-get install {pkg})")
    return found


def _check_tools() -> None:
    for tool in HOST_TOOLS:
        _which(tool)


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    argv = [_which(argv[0]), *argv[1:]]
    merged = {**os.environ, "LC_ALL": "C", **(env or {})}
    proc = subprocess.run(argv, cwd=cwd, env=merged, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise GuestImageError(f"{' '.join(argv[:3])}... failed (exit {proc.returncode}): {err}")
    return proc.stdout


# --------------------------------------------------------------------------- package resolution


def _apt_depends(pkgs: Iterable[str]) -> dict[str, list[str]]:
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
                "--no-replaces", "--no-enhances", *pkgs])
    deps: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line and not line[0].isspace():
            current = deps.setdefault(line.strip(), [])
            continue
        m = re.match(r"\s+\|?(?:Pre)?Depends:\s+(\S+)", line)
        if m and not m.group(1).startswith("<"):
            current.append(m.group(1))
    return deps


def _kernel_package() -> str:
    for dep in _apt_depends([KERNEL_META]).get(KERNEL_META, []):
        if re.fullmatch(r"linux-image-[0-9].*-amd64", dep):
            return dep
    raise GuestImageError(f"cannot resolve {KERNEL_META} to a versioned kernel package (run apt-get update)")


def _library_closure(root: str) -> list[str]:
    """The shared-library packages ``root`` needs, recursively (lib*, zlib*)."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        deps = _apt_depends(todo)
        todo = []
        for dep in (d for ds in deps.values() for d in ds):
            if dep not in seen and re.match(r"(lib|zlib)", dep) and not dep.endswith(("-dev", "-perl")):
                seen.add(dep)
                todo.append(dep)
    return sorted(seen)


def _candidates(pkgs: Iterable[str]) -> dict[str, str]:
    names = sorted(set(pkgs))
    out = _run(["apt-cache", "policy", *names])
    versions: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        m = re.match(r"\s+Candidate:\s+(\S+)", line)
        if m and current:
            versions[current] = m.group(1)
    for name in names:
        if versions.get(name, "(none)") == "(none)":
            raise GuestImageError(f"Debian package {name} has no installable version (run apt-get update)")
    return versions


def _apt_fingerprint() -> str:
    """Changes whenever ``apt-get update`` changes the package lists."""
    h = hashlib.sha256()
    for base in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        with contextlib.suppress(OSError):
            for p in sorted(base.rglob("*")):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _Plan:
    kernel: str
    libs: tuple[str, ...]
    versions: dict[str, str]

    @property
    def packages(self) -> list[str]:
        return [self.kernel, BUSYBOX, AGENT, *self.libs]

    def key(self) -> str:
        h = hashlib.sha256(_recipe_hash().encode())
        for name in sorted(self.versions):
            h.update(f"{name}={self.versions[name]}\n".encode())
        return h.hexdigest()[:16]


def _recipe_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _resolve(cache: Path) -> _Plan:
    """Package names and versions; remembered until the apt lists change."""
    memo = cache / "resolved.json"
    fingerprint = _apt_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["fingerprint"] == fingerprint and saved["recipe"] == _recipe_hash():
            return _Plan(saved["kernel"], tuple(saved["libs"]), dict(saved["versions"]))
    kernel = _kernel_package()
    libs = tuple(_library_closure(AGENT))
    plan = _Plan(kernel, libs, _candidates([kernel, BUSYBOX, AGENT, *libs]))
    _write_atomic(memo, json.dumps({"fingerprint": fingerprint, "recipe": _recipe_hash(), "kernel": kernel,
                                    "libs": list(libs), "versions": plan.versions}, indent=1).encode())
    return plan


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _deb_path(debs: Path, name: str, version: str) -> Path | None:
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{_glob_escape(name)}_{_glob_escape(quoted)}_*.deb"))
    return found[0] if found else None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _download(plan: _Plan, debs: Path, tmp: Path) -> dict[str, Path]:
    debs.mkdir(parents=True, exist_ok=True)
    missing = [n for n in plan.packages if _deb_path(debs, n, plan.versions[n]) is None]
    if missing:
        dl = tmp / "download"
        dl.mkdir()
        _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download",
              *(f"{n}={plan.versions[n]}" for n in missing)], cwd=dl)
        for deb in dl.glob("*.deb"):
            os.replace(deb, debs / deb.name)
    out: dict[str, Path] = {}
    for name in plan.packages:
        path = _deb_path(debs, name, plan.versions[name])
        if path is None:
            raise GuestImageError(f"apt-get download did not fetch {name}={plan.versions[name]}")
        out[name] = path
    # old versions of our packages are dead weight (a kernel is 70 MB)
    keep = set(out.values())
    for name in plan.packages:
        for old in debs.glob(f"{_glob_escape(name)}_*.deb"):
            if old not in keep and old.name.split("_")[0] == name:
                with contextlib.suppress(OSError):
                    old.unlink()
    return out


# --------------------------------------------------------------------------- assembling


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


def _syslinux_cfg() -> bytes:
    return (
        "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT vmorch\n"
        f"LABEL vmorch\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  APPEND {KERNEL_CMDLINE}\n"
    ).encode()


def _assemble(plan: _Plan, debs: dict[str, Path], tmp: Path) -> Path:
    root = tmp / "root"
    root.mkdir()
    for name in plan.packages:
        _run(["dpkg-deb", "-x", str(debs[name]), str(root)])
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
