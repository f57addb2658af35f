"""The lease of held locks (guarantee 6): how long a holder may act after its last successful
acquisition or renewal, and ``Holding``, what ``LockManager.hold`` yields, with its local loss check.

The rules are described in ``orchestrator.control.locks``, which re-exports every name here. This
module does not import ``redis_lock`` (only ``locks.py`` does): a held lock is typed by what is
used of it (``RedisLock``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.model.errors import LeaseExpired, LockLost
from orchestrator.store.jobstore import Fence

from .lockhierarchy import LockName

#: the lease's margin, relative: clock rate drift between a host and Redis (NTP slews at most 0.05 %)
CLOCK_RATE_DRIFT = 0.01
#: the lease's margin, absolute (s): a check to its libvirt call, and that call's own time
LEASE_MARGIN_S = 1.0


def lease_seconds(expire: float) -> float:
    """How long after sending a successful acquisition or renewal a holder may act (see ``locks``)."""
    return expire * (1 - CLOCK_RATE_DRIFT) - LEASE_MARGIN_S


class RedisLock(Protocol):
    """What a ``HeldLock`` uses of its ``redis_lock.Lock``."""

    def release(self) -> None: ...

    def extend(self, expire: int | None = None) -> None: ...


@dataclass(eq=False)
class HeldLock:
    name: LockName
    lock: RedisLock
    fence: Fence
    #: time.monotonic() when the acquisition or the last successful renewal was *sent*
    renewed_at: float
    lost: str | None = None
    #: whether the lock was taken when first asked for
    waited: bool = False
    acquired_at: float = field(default_factory=time.monotonic)


@dataclass
class Holding:
    """What ``LockManager.hold`` yields: the held locks, their fences, and the loss check."""

    locks: tuple[HeldLock, ...]
    expire: int
    _by_name: dict[LockName, HeldLock] = field(init=False)
    #: seconds after a successful acquisition or renewal was sent that the holder may act (``lease_seconds``)
    lease: float = field(init=False)

    def __post_init__(self) -> None:
        self._by_name = {h.name: h for h in self.locks}
        self.lease = lease_seconds(self.expire)

    def fence(self, name: LockName) -> Fence:
        return self._by_name[name].fence

    def lease_ends_at(self) -> float:
        """The ``time.monotonic()`` at which the first of these leases ends (-inf if a lock is known lost).

        Known locally: no Redis round trip.
        """
        if any(h.lost for h in self.locks):
            return float("-inf")
        return min((h.renewed_at + self.lease for h in self.locks), default=float("inf"))

    def lease_remaining(self) -> float:
        """Seconds the holder may still act on what these locks protect; <= 0: stop."""
        return self.lease_ends_at() - time.monotonic()

    def check(self) -> None:
        """Raise ``LockLost`` if a held lock was lost, ``LeaseExpired`` if its lease ran out.

        Call before each side effect. Local: no Redis round trip.
        """
        now = time.monotonic()
        for h in self.locks:
            if h.lost:
                raise LockLost(f"lost lock {h.name}: {h.lost}")
            if now >= h.renewed_at + self.lease:
                raise LeaseExpired(f"the lease of lock {h.name} ran out: not renewed for {now - h.renewed_at:.1f}s, "
                                   f"it may have expired", hint="Redis did not answer in time; the job runs again")
