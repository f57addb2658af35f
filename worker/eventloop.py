"""libvirt's process-wide event loop, started once before any connection is opened.

The embedded QEMU driver (``qemu:///embed``) runs inside this process: it talks to QEMU's
monitor through libvirt's event loop, so without a thread turning that loop every call
that waits for QEMU hangs. libvirt only honours an event implementation registered
*before* the first connection is opened, hence "once per process, first".
"""

from __future__ import annotations

import logging
import threading
import time

import libvirt

log = logging.getLogger("vmorch.libvirt")

_lock = threading.Lock()
_started = False


def _log_libvirt_error(_ctx: object, err: tuple[object, ...]) -> None:
    # Without a handler, libvirt prints every error to stderr even though the driver
    # catches it and raises a vmorch error; keep it for debugging only.
    log.debug("libvirt: %s", err[2] if len(err) > 2 else err)


def _run() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            # A failed iteration must not kill the only thread driving QEMU's monitors.
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (idempotent)."""
    global _started
    with _lock:
        if _started:
            return
        libvirt.registerErrorHandler(_log_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run, name="libvirt-events", daemon=True).start()
        _started = True
