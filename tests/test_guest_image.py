"""The test guest image boots for real under TCG, and the KVM probe answers.

Real processes only: the image is built from Debian packages (cached), booted in plain
``qemu-system-x86_64 -accel tcg`` with user-mode networking (it stays inside QEMU), and
driven through its serial console, its guest agent and QMP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from orchestrator.localcluster import guestimage
from worker import accel

from .guest import BOOT_MARKER, Qemu, guest_image

__all__ = ["guest_image"]  # the fixture, imported so that pytest sees it here

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"),
]

ROOT = Path(__file__).resolve().parent.parent

# Deadlines for a loaded 2-core machine; an idle one boots the image to its marker in ~7 s under TCG.
BOOT_DEADLINE = 120.0
AGENT_DEADLINE = 90.0
POWEROFF_DEADLINE = 60.0


@pytest.fixture(scope="module")
def booted(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qemu]:
    """One TCG guest shared by this module's tests (the last one reboots it and powers it off)."""
    vm = Qemu(guest_image, tmp_path_factory.mktemp("guest"), accel="tcg")
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()


# --------------------------------------------------------------------------- the image


def test_build_returns_a_small_cached_qcow2(guest_image: Path) -> None:
    start = time.monotonic()
    again = guestimage.build()
    warm = time.monotonic() - start
    assert again == guest_image
    assert warm < 5.0, f"a cached build() took {warm:.2f}s"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(guest_image)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2"
    assert guest_image.stat().st_size < 64 << 20, f"the image is {guest_image.stat().st_size} bytes"
    print(f"\nimage {guest_image}: {guest_image.stat().st_size / 2**20:.1f} MiB, warm build() {warm * 1000:.0f} ms")


@pytest.mark.slow
def test_concurrent_builders_share_one_image(guest_image: Path, tmp_path: Path) -> None:
    """Three processes build into one empty cache at once: one builds, all print the same valid image."""
    cache = tmp_path / "cache"
    debs = cache / "debs"
    debs.mkdir(parents=True)
    for deb in (guest_image.parent.parent / "debs").glob("*.deb"):  # no download: reuse the fetched packages
        try:
            os.link(deb, debs / deb.name)
        except OSError:
            shutil.copyfile(deb, debs / deb.name)
    env = {**os.environ, guestimage.CACHE_ENV: str(cache)}
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator.localcluster.guestimage"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _out, err in outs]
    paths = {out.strip() for out, _err in outs}
    assert len(paths) == 1, paths
    image = Path(paths.pop())
    assert image.parent == cache / "images"
    assert image.name == guest_image.name  # same packages, same recipe: same key
    subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)
    assert not list(cache.glob(".build-*")), "a builder left its temporary directory"


def test_missing_host_tool_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(guestimage.HOST_TOOLS, "vmorch-no-such-tool", "vmorch-pkg")
    with pytest.raises(guestimage.GuestImageError) as info:
        guestimage.build()
    message = str(info.value)
    assert "\n" not in message
    assert "'vmorch-no-such-tool'" in message and "apt-get install vmorch-pkg" in message


# --------------------------------------------------------------------------- the KVM probe


def _children() -> set[int]:
    mine = str(os.getpid())
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[1] == mine:
                kids.add(int(stat.parent.name))
    return kids


def test_probe_answers_quickly_and_cleans_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(accel.ACCEL_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _children()
    start = time.monotonic()
    result = accel.probe(timeout=8.0)
    took = time.monotonic() - start
    assert result.kind in ("kvm", "tcg")
    assert result.reason
    assert took < 30.0
    assert list(tmp_path.iterdir()) == [], "the probe left temporary files"
    assert _children() <= before, "the probe left a process behind"
    print(f"\nprobe: {result.kind} ({result.reason}) in {took:.2f}s")


@pytest.mark.parametrize("kind", ["kvm", "tcg"])
def test_probe_can_be_forced(monkeypatch: pytest.MonkeyPatch, kind: Literal["kvm", "tcg"]) -> None:
    monkeypatch.setenv(accel.ACCEL_ENV, kind)
    assert accel.probe("/nonexistent/qemu") == accel.Accel(kind, "forced by VMORCH_ACCEL")


def test_probe_without_qemu_binary_says_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(accel.ACCEL_ENV, raising=False)
    result = accel.probe("/nonexistent/qemu-system-x86_64")
    assert result.kind == "tcg"
    assert "/nonexistent/qemu-system-x86_64" in result.reason


def test_probe_boot_sector_reaches_long_mode_under_tcg(tmp_path: Path) -> None:
    """The hand-assembled sector itself is right: under TCG it prints every stage and powers off."""
    sector = accel.boot_sector()
    assert len(sector) == 512 and sector[-2:] == b"\x55\xaa"
    disk = tmp_path / "probe.img"
    disk.write_bytes(sector)
    serial = tmp_path / "serial.log"
    proc = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "32", "-nodefaults",
                             "-display", "none", "-no-reboot", "-serial", f"file:{serial}",
                             "-drive", f"file={disk},format=raw,if=ide"], stdin=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=60) == 0  # the sector's ACPI power-off ends QEMU
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = serial.read_text(errors="replace")
    assert "vmorch-probe: real mode" in text and "vmorch-probe: protected mode" in text
    assert accel.MARKER.decode() in text


# --------------------------------------------------------------------------- a real boot under TCG


@pytest.mark.slow
def test_boots_to_marker(booted: Qemu) -> None:
    took = booted.wait_serial(BOOT_MARKER, BOOT_DEADLINE)
    print(f"\nTCG boot to marker: {took:.1f}s")


@pytest.mark.slow
def test_guest_agent_ping_and_exec(booted: Qemu) -> None:
    booted.wait_serial(BOOT_MARKER, BOOT_DEADLINE)
    agent = booted.agent(timeout=AGENT_DEADLINE)
    try:
        print(f"\nTCG boot to agent: {time.monotonic() - booted.started_at:.1f}s")
        assert agent.call("guest-ping") == {}
        assert agent.exec(["/bin/echo", "hi"]) == (0, "hi\n", "")
    finally:
        agent.close()


@pytest.mark.slow
def test_dhcp_gives_eth0_an_address(booted: Qemu) -> None:
    booted.wait_serial(BOOT_MARKER, BOOT_DEADLINE)
    agent = booted.agent(timeout=AGENT_DEADLINE)
    try:
        deadline = time.monotonic() + 60.0
        addresses: list[str] = []
        while True:
            interfaces = agent.call("guest-network-get-interfaces")
            addresses = [a["ip-address"] for i in interfaces if i["name"] == "eth0"
                         for a in i.get("ip-addresses", []) if a["ip-address-type"] == "ipv4"]
            if addresses or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert addresses == ["10.0.2.15"], interfaces  # QEMU user networking's first lease
        code, out, _err = agent.exec(["ip", "-4", "addr", "show", "dev", "eth0"])
        assert code == 0 and "inet 10.0.2.15/24" in out, out
        code, out, _err = agent.exec(["ip", "route"])
        assert "default via 10.0.2.2 dev eth0" in out, out
    finally:
        agent.close()


@pytest.mark.slow
def test_serial_console_runs_typed_commands(booted: Qemu) -> None:
    booted.wait_serial(BOOT_MARKER, BOOT_DEADLINE)
    booted.wait_serial("vmorch-guest# ", 60.0)  # the root shell's prompt on ttyS0
    booted.type_line("echo serial-$((6 * 7)); free | head -2")
    booted.wait_serial("serial-42", 60.0)
    booted.wait_serial("Mem:", 60.0)


@pytest.mark.slow
def test_reboot_then_acpi_power_button_powers_off(booted: Qemu) -> None:
    """Last in the module: 'reboot' really reboots; then system_powerdown (ACPI) ends QEMU."""
    booted.wait_serial(BOOT_MARKER, BOOT_DEADLINE)
    booted.wait_serial("vmorch-guest# ", 60.0)
    booted.type_line("reboot")
    booted.wait_serial(BOOT_MARKER, BOOT_DEADLINE, count=2)
    pressed = time.monotonic()
    booted.qmp().execute("system_powerdown")
    assert booted.wait_exit(POWEROFF_DEADLINE) == 0
    print(f"\nACPI power button to QEMU exit: {time.monotonic() - pressed:.1f}s")
    assert "reboot: Power down" in booted.serial_text()
