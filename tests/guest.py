"""The real test guest: its image (built once per machine, cached) and a plain-QEMU runner.

Use it in a test module with ``from .guest import guest_image`` (``tests/conftest.py`` may
re-export it so that every module gets it without the import). ``guest_image`` is the
path of the cached qcow2 from :func:`orchestrator.localcluster.guestimage.build`; never
write to it: boot a copy-on-write overlay (``Qemu`` does, and so do libvirt disks backed
by it).

``Qemu`` boots that image in ``qemu-system-x86_64`` with the serial console on a unix
socket (everything it prints is kept and also written to ``serial.log``), the guest
agent's virtio-serial channel on another one, QMP on a third, and user-mode networking
(which stays inside QEMU). Every wait has a deadline; ``stop()`` ends QEMU by its PID.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.localcluster.guestimage import AGENT_CHANNEL, BOOT_MARKER, build

__all__ = ["BOOT_MARKER", "Agent", "Qemu", "Qmp", "guest_image"]


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The bootable test guest (qcow2), built on first use and cached across runs."""
    return build()


def _deadline_loop(timeout: float, what: str, interval: float = 0.05) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _connect_unix(path: Path, timeout: float) -> socket.socket:
    for _ in _deadline_loop(timeout, f"the unix socket {path}"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
    raise AssertionError("unreachable")


class Qmp:
    """A QMP monitor connection (commands answered in order; events are skipped)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._sock = _connect_unix(path, timeout)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rwb")
        greeting = json.loads(self._file.readline())
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        while True:
            line = self._file.readline()
            if not line:
                raise ConnectionError(f"QMP closed while waiting for the answer to {command}")
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()


class Agent:
    """A qemu-guest-agent client on the host end of the virtio-serial channel."""

    def __init__(self, path: Path, timeout: float) -> None:
        """Connect and synchronize (``guest-sync``), retrying until the agent answers or ``timeout``."""
        for _ in _deadline_loop(timeout, "the guest agent to answer guest-sync", interval=0.2):
            sock = _connect_unix(path, timeout)
            sock.settimeout(3.0)
            file = sock.makefile("rwb")
            try:
                if self._sync(file):
                    self._sock, self._file = sock, file
                    self._sock.settimeout(30.0)
                    return
            except (OSError, ValueError):
                pass
            file.close()
            sock.close()

    @staticmethod
    def _sync(file: Any) -> bool:
        token = random.randrange(1, 2**31)
        # 0xff first: it resets the agent's JSON parser whatever a previous client left in it
        file.write(b"\xff" + json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
        file.flush()
        while True:
            line = file.readline()
            if not line:
                return False
            with contextlib.suppress(ValueError):
                if json.loads(line.strip(b"\xff")).get("return") == token:
                    return True

    def call(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        reply = json.loads(self._file.readline())
        if "error" in reply:
            raise RuntimeError(f"guest agent {command}: {reply['error']}")
        return reply["return"]

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run ``argv`` in the guest (guest-exec), wait for it, return (exit code, stdout, stderr)."""
        pid = self.call("guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})["pid"]
        status: dict[str, Any] = {}
        for _ in _deadline_loop(timeout, f"{argv} to finish in the guest"):
            status = self.call("guest-exec-status", pid=pid)
            if status["exited"]:
                break
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        return int(status.get("exitcode", -1)), out, err

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()


class Qemu:
    """One test guest in plain QEMU (no libvirt), on a copy-on-write overlay of ``image``."""

    def __init__(self, image: Path, workdir: Path, accel: str = "tcg", memory_mib: int = 256,
                 no_reboot: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.image = image
        self.dir = workdir
        self.accel = accel
        self.memory_mib = memory_mib
        self.no_reboot = no_reboot
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._serial = bytearray()
        self._serial_lock = threading.Lock()
        self._serial_sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._qmp: Qmp | None = None

    # paths
    @property
    def serial_sock(self) -> Path:
        return self.dir / "serial.sock"

    @property
    def agent_sock(self) -> Path:
        return self.dir / "qga.sock"

    @property
    def qmp_sock(self) -> Path:
        return self.dir / "qmp.sock"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        overlay = self.dir / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.image),
                        str(overlay)], check=True, stdin=subprocess.DEVNULL)
        argv = [
            "qemu-system-x86_64", "-accel", self.accel, "-m", str(self.memory_mib), "-nodefaults",
            "-display", "none", "-no-user-config", *(["-no-reboot"] if self.no_reboot else []),
            "-drive", f"file={overlay},format=qcow2,if=virtio",
            # the serial console waits for our reader, so no byte of the boot is lost
            "-chardev", f"socket,id=ser0,path={self.serial_sock},server=on,wait=on",
            "-serial", "chardev:ser0",
            "-chardev", f"socket,id=qga0,path={self.agent_sock},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_CHANNEL}",
            "-nic", "user,model=virtio-net-pci",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            *self.extra,
        ]
        log = (self.dir / "qemu.log").open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._serial_sock = _connect_unix(self.serial_sock, 30.0)
        self._reader = threading.Thread(target=self._read_serial, name="serial-reader", daemon=True)
        self._reader.start()

    def _read_serial(self) -> None:
        assert self._serial_sock is not None
        with (self.dir / "serial.log").open("ab") as log:
            while True:
                try:
                    chunk = self._serial_sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                with self._serial_lock:
                    self._serial += chunk
                log.write(chunk)
                log.flush()

    def serial_text(self) -> str:
        with self._serial_lock:
            return self._serial.decode(errors="replace")

    def wait_serial(self, text: str, timeout: float, count: int = 1) -> float:
        """Wait until ``text`` appeared ``count`` times on the console; return seconds since start."""
        for _ in _deadline_loop(timeout, f"{text!r} (x{count}) on the serial console; it shows:\n"
                                         f"{self.serial_text()[-2000:]}"):
            if self.serial_text().count(text) >= count:
                return time.monotonic() - self.started_at
            self._assert_running(f"waiting for {text!r}")
        raise AssertionError("unreachable")

    def type_line(self, line: str) -> None:
        assert self._serial_sock is not None
        self._serial_sock.sendall(line.encode() + b"\r")

    def agent(self, timeout: float = 60.0) -> Agent:
        return Agent(self.agent_sock, timeout)

    def qmp(self) -> Qmp:
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_sock)
        return self._qmp

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU (pid {self.proc.pid}) still runs {timeout:g}s later; the console shows:\n"
                                 f"{self.serial_text()[-2000:]}") from None

    def _assert_running(self, doing: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.dir / "qemu.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"QEMU exited ({self.proc.returncode}) while {doing}: {log}\nconsole:\n"
                                 f"{self.serial_text()[-2000:]}")

    def stop(self) -> None:
        """Kill QEMU by its PID (if it still runs) and close every connection."""
        if self._qmp is not None:
            self._qmp.close()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        if self._serial_sock is not None:
            with contextlib.suppress(OSError):
                self._serial_sock.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
