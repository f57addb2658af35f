"""Each VM's serial console: its output kept on the host and served through Redis, and its input.

How it flows (``domxml`` gives every domain a pty serial console with a ``<log>``):

* **Output.** QEMU itself appends everything the guest prints on ttyS0 to the domain's console
  log (``domxml.console_log_path``, in the host's storage directory), whether anyone listens or not, and while
  this worker is down. The relay thread here tails each running domain's log and appends what is
  new to the VM's stream ``P:vm:<ns>:<name>:console`` (XADD MAXLEN ~ ``keys.CONSOLE_MAX``), with
  the file offset after each entry, so a restarted worker carries on where the stream ends. The
  log is kept under ``LOG_MAX`` bytes by rotation: once shipped past that, it is copied to
  ``<log>.1`` and truncated (QEMU opened it ``O_APPEND``, so it goes on writing at the new end;
  what the guest prints in the instant between the last read and the truncation is lost).
* **Input.** ``vm console`` pushes keystrokes to ``...:console:in`` while it holds the writer lease
  (``orchestrator.services.console``); the relay pops them (BLPOP over the running VMs' lists,
  which is also its tick) and writes them to the domain's pty, opened raw on first input and
  closed after ``PTY_IDLE_S`` without any (while it is open, QEMU's output is drained from it).
* **Deletion.** A deleted VM's stream, input list, lease and log files go with it (``forget``,
  called by the delete job); a tombstone of the domain's UUID stops this relay writing a last
  chunk of it after that.

Readers (``vm log``, ``vm console``, the API) only ever read the stream: they reach any host's
VMs through Redis, and never this host's files.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import logging
import os
import shutil
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import libvirt
from redis import Redis
from redis.exceptions import RedisError

from orchestrator.model.errors import VmorchError
from orchestrator.store import keys

from . import domxml
from .background import Background
from .libvirtconn import LibvirtConnection

log = logging.getLogger(__name__)

#: a console log is rotated once it is larger than this (bytes)
LOG_MAX = 1024 * 1024
#: the most the relay reads of one log in one tick
_READ_MAX = 256 * 1024
PTY_IDLE_S = 60.0

# Domains deleted through ``forget``: the relay writes nothing more of them (UUIDs; a relaunch gets a new one).
_forgotten: set[str] = set()
_forget_lock = threading.Lock()


@dataclass
class _Console:
    uuid: str
    namespace: str
    vm: str
    log: Path | None
    pty: str | None
    offset: int = -1  # -1: not resumed from the stream yet
    ident: str = ""
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    fd: int | None = None
    last_input: float = 0.0

    @property
    def stream(self) -> str:
        return keys.vm_console(self.namespace, self.vm)

    @property
    def inbox(self) -> str:
        return keys.vm_console_input(self.namespace, self.vm)


def domain_console(driver: LibvirtConnection, domain: str) -> tuple[str, Path | None] | None:
    """``(uuid, console log)`` of a defined domain, or None if there is none."""
    try:
        dom = driver.conn.lookupByName(domain)
        xml = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        uuid = str(dom.UUIDString())
    except libvirt.libvirtError:
        return None
    path, _ = domxml.console_of(xml)
    return uuid, Path(path) if path else None


def forget(redis: Redis, namespace: str, vm: str, uuid: str | None, log_file: Path | None) -> None:
    """A deleted VM's console: its keys and its log files go, and the relay writes no more of it."""
    with _forget_lock:
        if uuid:
            _forgotten.add(uuid)
        redis.delete(keys.vm_console(namespace, vm), keys.vm_console_input(namespace, vm),
                     keys.vm_console_writer(namespace, vm))
    if log_file is not None:
        for path in (log_file, rotated(log_file)):
            path.unlink(missing_ok=True)


def rotated(log_file: Path) -> Path:
    return log_file.with_name(log_file.name + ".1")


class ConsoleRelay(Background):
    """One thread per worker: every running domain's console log to Redis, and input to its pty."""

    thread_name = "console"

    def __init__(self, driver: LibvirtConnection, redis: Redis, host: str, *, tick: float = 0.1,
                 scan_every: float = 1.0, log_max: int = LOG_MAX) -> None:
        self.driver = driver
        self.redis = redis
        self.host = host
        self.tick = tick
        self.scan_every = scan_every
        self.log_max = log_max
        self.consoles: dict[tuple[str, int], _Console] = {}
        self._scanned_at = 0.0
        super().__init__()

    def stop(self) -> None:
        super().stop()
        for console in self.consoles.values():
            self._close(console)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except (RedisError, VmorchError, libvirt.libvirtError, OSError) as exc:
                log.warning("console relay: %s", exc)
                self._stop.wait(1.0)

    def step(self) -> None:
        """One tick: find the running domains (now and then), ship new output, deliver input."""
        if time.monotonic() - self._scanned_at >= self.scan_every:
            self._scan()
        for console in list(self.consoles.values()):
            self._ship(console)
        self._deliver()
        self._drain()

    # -- which domains ---------------------------------------------------------------------

    def _scan(self) -> None:
        self._scanned_at = time.monotonic()
        running: set[tuple[str, int]] = set()
        for dom in self.driver.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                key = (str(dom.UUIDString()), int(dom.ID()))
                running.add(key)
                if key not in self.consoles:
                    self._add(key, str(dom.XMLDesc(0)))
                elif self.consoles[key].pty is None:  # seen while QEMU was starting: its pty shows once it is up
                    self.consoles[key].pty = domxml.console_of(str(dom.XMLDesc(0)))[1]
            except libvirt.libvirtError:
                continue  # it went away meanwhile
        for key in set(self.consoles) - running:
            console = self.consoles.pop(key)
            self._ship(console)  # what it printed last (a shutdown's last lines)
            self._close(console)

    def _add(self, key: tuple[str, int], xml: str) -> None:
        meta = domxml.parse_metadata(xml)
        if meta is None:
            return  # not vmorch's
        log_file, pty = domxml.console_of(xml)
        for old in [k for k in self.consoles if k[0] == key[0]]:  # the same domain, started again
            self._close(self.consoles.pop(old))
        self.consoles[key] = _Console(key[0], meta.namespace, meta.vm, Path(log_file) if log_file else None, pty)

    # -- output ----------------------------------------------------------------------------

    def _resume(self, console: _Console, ident: str, size: int) -> None:
        """Carry on after the last entry in the stream, if it came from this very file."""
        console.offset, console.ident = 0, ident
        last = cast(list[tuple[str, dict[str, str]]], self.redis.xrevrange(console.stream, count=1))
        if last:
            fields = last[0][1]
            offset = int(fields.get("o") or 0)
            if fields.get("f") == ident and offset <= size:
                console.offset = offset

    def _ship(self, console: _Console) -> None:
        if console.log is None:
            return
        try:
            st = console.log.stat()
        except FileNotFoundError:
            return
        ident = f"{self.host}:{st.st_ino}"
        if console.offset < 0:
            self._resume(console, ident, st.st_size)
        if ident != console.ident or st.st_size < console.offset:  # replaced or truncated by someone else
            console.offset, console.ident = 0, ident
        if st.st_size > console.offset:
            self._append(console, st.st_size)
        if console.offset > self.log_max:
            self._rotate(console)

    def _append(self, console: _Console, size: int) -> None:
        assert console.log is not None
        with console.log.open("rb") as f:
            f.seek(console.offset)
            data = f.read(min(size - console.offset, _READ_MAX))
        entries = []
        offset = console.offset
        for start in range(0, len(data), keys.CONSOLE_CHUNK):
            piece = data[start:start + keys.CONSOLE_CHUNK]
            offset += len(piece)
            entries.append({"d": console.decoder.decode(piece), "o": str(offset), "f": console.ident})
        with _forget_lock:
            if console.uuid in _forgotten:
                return
            pipe = self.redis.pipeline(transaction=False)
            for entry in entries:
                pipe.xadd(console.stream, entry, maxlen=keys.CONSOLE_MAX, approximate=True)  # type: ignore[arg-type]
            pipe.execute()
        console.offset = offset

    def _rotate(self, console: _Console) -> None:
        assert console.log is not None
        size = console.log.stat().st_size
        if size > console.offset:
            self._append(console, size)  # what came since the last read: shipped before it goes
        shutil.copyfile(console.log, rotated(console.log))
        os.truncate(console.log, 0)
        console.offset = 0

    # -- input -----------------------------------------------------------------------------

    def _deliver(self) -> None:
        consoles = {c.inbox: c for c in self.consoles.values() if c.pty}
        if not consoles:
            self._stop.wait(self.tick)
            return
        popped = self.redis.blpop(list(consoles), timeout=self.tick)
        if not popped:
            return
        inbox, first = cast(tuple[str, str], popped)
        rest = cast(list[str] | None, self.redis.lpop(inbox, 1000)) or []
        self._type(consoles[inbox], "".join([first, *rest]).encode())

    def _type(self, console: _Console, data: bytes) -> None:
        if console.fd is None:
            assert console.pty is not None
            console.fd = os.open(console.pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(console.fd)  # QEMU made it raw; a line discipline here would echo output back as input
        console.last_input = time.monotonic()
        deadline = time.monotonic() + 2.0
        while data and time.monotonic() < deadline:
            try:
                data = data[os.write(console.fd, data):]
            except BlockingIOError:
                self._drain_one(console)
                time.sleep(0.01)

    def _drain(self) -> None:
        for console in self.consoles.values():
            if console.fd is not None:
                self._drain_one(console)
                if time.monotonic() - console.last_input > PTY_IDLE_S:
                    self._close(console)

    def _drain_one(self, console: _Console) -> None:
        """QEMU copies output to the pty while it is open: read it away (the log has it)."""
        assert console.fd is not None
        while True:
            try:
                if not os.read(console.fd, 65536):
                    return
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EIO:  # QEMU closed its end
                    self._close(console)
                    return
                raise

    @staticmethod
    def _close(console: _Console) -> None:
        if console.fd is not None:
            with contextlib.suppress(OSError):
                os.close(console.fd)
            console.fd = None
