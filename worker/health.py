"""Whether this host's libvirt answers, probed off the heartbeat's thread.

The result travels in every heartbeat (``libvirt_ok``, ``libvirt_error``) so that
``vmorch doctor`` and the metrics can tell "the worker is up but its libvirtd is not".
The probe has its own thread: a hung libvirtd must not stop the heartbeat, or the host
would look down when only its hypervisor is.
"""

from __future__ import annotations

import logging
import threading
import time

import libvirt

from orchestrator.model.errors import VmorchError

from .driver import Driver

log = logging.getLogger(__name__)


class LibvirtProbe:
    def __init__(self, driver: Driver, interval: float) -> None:
        self.driver = driver
        self.interval = interval
        self._fields = {"libvirt_ok": "", "libvirt_error": "not probed yet"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmorch-libvirt-probe", daemon=True)

    def check(self) -> dict[str, str]:
        """Probe now: a cheap call through the worker's own connection (which reopens a dead one)."""
        started = time.monotonic()
        try:
            version = self.driver.conn.getLibVersion()
        except (VmorchError, libvirt.libvirtError) as exc:
            message = exc.message if isinstance(exc, VmorchError) else (exc.get_error_message() or str(exc))
            fields = {"libvirt_ok": "", "libvirt_error": message}
        else:
            fields = {"libvirt_ok": "1", "libvirt_error": "",
                      "libvirt_version": f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}",
                      "libvirt_probe_ms": f"{(time.monotonic() - started) * 1000:.1f}"}
        if fields["libvirt_ok"] != self._fields["libvirt_ok"]:
            if fields["libvirt_ok"]:
                log.info("libvirt %s answers", self.driver.uri)
            else:
                log.error("libvirt %s does not answer: %s", self.driver.uri, fields["libvirt_error"])
        self._fields = fields
        return fields

    def fields(self) -> dict[str, str]:
        return dict(self._fields)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def stop(self) -> None:
        self._stop.set()
