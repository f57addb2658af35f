"""Which accelerator QEMU can really use on this host: KVM, or TCG (software emulation).

Opening ``/dev/kvm`` proves little: under nested virtualization (here a PVM-style
``kvm_pvm`` module) the device opens and SeaBIOS even runs, yet the first protected-mode
code of a real guest's boot loader stops with "KVM internal error. Suberror: 1". So
:func:`probe` boots a hand-assembled 512-byte boot sector under ``-accel kvm`` through
SeaBIOS. It walks the path every real guest takes: real mode, 32-bit protected mode with
an ``iret``, then 64-bit long mode with paging; it prints a line on COM1 (I/O port 0x3f8)
at each stage, the marker last, then powers off through the PIIX4 PM1a control register
(port 0x604, as SeaBIOS maps it). KVM is reported only if the marker arrived.
``VMORCH_ACCEL=kvm|tcg`` in the environment forces the answer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ACCEL_ENV", "MARKER", "Accel", "boot_sector", "probe"]

ACCEL_ENV = "VMORCH_ACCEL"
MARKER = b"VMORCH-KVM-OK"

# GNU as source (as --32; ld -m elf_i386 -Ttext=0x7c00 --oformat binary), loaded at 0x7c00:
#   .code16: cli; ds=es=ss=0; sp=0x7c00; print "vmorch-probe: real mode"; lgdt;
#            cr0.PE=1; ljmp 0x08:pm32
#   .code32: ds=es=ss=0x10; pushf; push 0x08; push after; iret;
#            after: print "vmorch-probe: protected mode"; zero 0x1000-0x3fff;
#            PML4[0]=0x2003, PDPT[0]=0x3003, PD[0]=0x83 (2 MiB identity); cr3=0x1000;
#            cr4.PAE=1; EFER.LME=1; cr0.PG=1; ljmp 0x18:lm64
#   .code64: print "VMORCH-KVM-OK"; out 0x604, 0x2000 (ACPI S5); 1: hlt; jmp 1b
#   gdt: null, code32 0x00cf9a000000ffff, data 0x00cf92000000ffff, code64 0x00af9a000000ffff
_SECTOR_HEX = (
    "fa31c08ed88ec08ed0bc007cfcbe067de81600660f0116007d0f20c00c010f22c066ea357c00000800baf803ac84c074"
    "03eeebf8c366b810008ed88ec08ed0bc007c00009c6a08684d7c0000cfbe207d0000e85d000000bf0010000031c0b900"
    "0c0000f3abc7050010000003200000c7050020000003300000c7050030000083000000b8001000000f22d80f20e083c8"
    "200f22e0b9800000c00f320d000100000f300f20c00d000000800f22c0eac17c0000180066baf803ac84c07403eeebf8"
    "c3be3f7d000066baf803ac84c07403eeebf866ba040666b8002066eff4ebfd900000000000000000ffff0000009acf00"
    "ffff00000092cf00ffff0000009aaf001f00e07c0000766d6f7263682d70726f62653a207265616c206d6f64650d0a00"
    "766d6f7263682d70726f62653a2070726f746563746564206d6f64650d0a00564d4f5243482d4b564d2d4f4b0d0a"
)
_STAGES = (
    ("vmorch-probe: protected mode", "after protected mode, on the way to long mode"),
    ("vmorch-probe: real mode", "after real mode, on the way to protected mode"),
)


@dataclass(frozen=True)
class Accel:
    kind: Literal["kvm", "tcg"]
    reason: str


def boot_sector() -> bytes:
    """The 512-byte probe MBR (see the listing above)."""
    body = bytes.fromhex(_SECTOR_HEX)
    return body + b"\0" * (510 - len(body)) + b"\x55\xaa"


def _kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open /dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


def _kvm_error(text: str) -> str | None:
    """The "KVM internal error. Suberror: N" line QEMU prints when KVM gives up, if any."""
    for line in text.splitlines():
        if "KVM internal error" in line:
            return line.strip()
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and "warning:" not in line]
    return lines[-1] if lines else "no output"


def _stage(serial: bytes) -> str:
    text = serial.decode(errors="replace")
    for line, where in _STAGES:
        if line in text:
            return f"the boot sector stopped {where}"
    return "SeaBIOS did not reach the boot sector"


def probe(qemu_binary: str = "qemu-system-x86_64", timeout: float = 8.0) -> Accel:
    """Tell whether QEMU guests on this host can use KVM; never raises for a broken host."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced in ("kvm", "tcg"):
        return Accel("kvm" if forced == "kvm" else "tcg", f"forced by {ACCEL_ENV}")
    qemu = shutil.which(qemu_binary)
    if qemu is None:
        return Accel("tcg", f"QEMU binary {qemu_binary!r} not found")
    problem = _kvm_device_problem()
    if problem:
        return Accel("tcg", problem)
    with tempfile.TemporaryDirectory(prefix="vmorch-accel-") as tmp:
        return _boot_probe(qemu, Path(tmp), timeout)


def _boot_probe(qemu: str, tmp: Path, timeout: float) -> Accel:
    disk, serial, errlog = tmp / "probe.img", tmp / "serial.log", tmp / "stderr.log"
    with disk.open("wb") as f:
        f.write(boot_sector())
        f.truncate(1 << 20)
    argv = [qemu, "-accel", "kvm", "-machine", "pc", "-m", "32", "-nodefaults", "-display", "none",
            "-no-reboot", "-no-user-config", "-serial", f"file:{serial}",
            "-drive", f"file={disk},format=raw,if=ide", "-boot", "c"]
    start = time.monotonic()
    with errlog.open("wb") as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        except OSError as exc:
            return Accel("tcg", f"cannot run {qemu}: {exc.strerror}")
        try:
            return _watch(proc, serial, errlog, start, timeout)
        finally:
            _stop(proc)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _watch(proc: subprocess.Popen[bytes], serial: Path, errlog: Path, start: float, timeout: float) -> Accel:
    deadline = start + timeout
    while True:
        if MARKER in _read(serial):
            return Accel("kvm", "a boot sector reached 64-bit long mode under KVM through SeaBIOS "
                                f"in {time.monotonic() - start:.2f}s")
        err = _read(errlog).decode(errors="replace")
        kvm_error = _kvm_error(err)
        if kvm_error:
            return Accel("tcg", f"{kvm_error} ({_stage(_read(serial))}): KVM cannot run guests here")
        code = proc.poll()
        if code is not None:
            if MARKER in _read(serial):
                continue
            err = _read(errlog).decode(errors="replace")
            return Accel("tcg", f"QEMU with -accel kvm exited with status {code} ({_stage(_read(serial))}): "
                                f"{_kvm_error(err) or _last_line(err)}")
        if time.monotonic() >= deadline:
            return Accel("tcg", f"the KVM probe guest did not finish within {timeout:g}s ({_stage(_read(serial))})")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()  # by PID: only the QEMU this probe started
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


if __name__ == "__main__":
    result = probe()
    print(f"{result.kind}: {result.reason}")
