"""Asking a guest to do something until it did: the ACPI power button of ``vm stop``, the reboot
request of ``vm reboot``.

A guest may miss a request: a press made while it still boots (firmware, boot loader, kernel:
~6 s under TCG) is dropped by QEMU, a guest busy elsewhere may take its time. So the request is
repeated every ``PRESS_EVERY_S`` until the guest did it or the time is up, and the caller says
which it was: never "done" on the strength of a request alone.

What counts as done is the caller's: the domain off (stop), or libvirt's reboot event for the
domain (``RebootWatch``: QEMU's RESET, which a guest's reboot and libvirt's own reboot both
end in).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import libvirt

#: how often a request the guest has not acted on is made again
PRESS_EVERY_S = 3.0
#: how often the guest is looked at in between
POLL_S = 0.2


@dataclass(frozen=True)
class Pressed:
    done: bool
    presses: int
    #: from the first request to the moment ``done`` was seen (or the time ran out)
    seconds: float


def press_until(
    press: Callable[[], None],
    done: Callable[[], bool],
    check: Callable[[], None],
    *,
    timeout_s: float,
    every_s: float = PRESS_EVERY_S,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Pressed:
    """``press()`` now and every ``every_s`` until ``done()`` or ``timeout_s`` passed (0: one press,
    one look). ``check()`` comes before every press and every look: the lease (a libvirt change may
    come next), the job's time limit, a cancel."""
    start = clock()
    deadline = start + timeout_s
    next_press = start
    presses = 0
    while True:
        check()
        now = clock()
        if now >= next_press and (presses == 0 or now < deadline):
            press()
            presses += 1
            next_press = now + every_s
        if done():
            return Pressed(True, presses, clock() - start)
        now = clock()
        if now >= deadline:
            return Pressed(False, presses, now - start)
        sleep(max(0.0, min(poll_s, deadline - now, next_press - now)))


class RebootWatch:
    """Whether libvirt reported a reboot (``VIR_DOMAIN_EVENT_ID_REBOOT``) of one domain since this was
    made. Registered on the connection for the duration of a ``with`` block; libvirt calls back on its
    event-loop thread (``worker.eventloop``), which only sets a flag."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        self._conn = conn
        self._seen = threading.Event()
        self._id = int(conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None))

    def _on_reboot(self, _conn: object, _dom: object, _opaque: object) -> None:
        self._seen.set()

    def happened(self) -> bool:
        return self._seen.is_set()

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):  # a connection gone meanwhile took it along
            self._conn.domainEventDeregisterAny(self._id)

    def __enter__(self) -> RebootWatch:
        return self

    def __exit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()
