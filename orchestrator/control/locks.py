"""The lock hierarchy: the only module that imports ``redis_lock``.

Levels, after minimega's ``cmdLock > vmLock > VM.lock > all other locks``:

=====  =========  ===============================  =====================================
level  name       lock name                        protects
=====  =========  ===============================  =====================================
1      ``cmd``    ``vmorch:cmd:<namespace>``       namespace-wide decisions (launch
                                                   placement, flush, namespace delete)
2      ``vms``    ``vmorch:vms:<namespace>``       the namespace's VM registry
3      ``vm``     ``vmorch:vm:<namespace>:<name>`` one VM: lifecycle, attributes, tags
4      ``other``  ``vmorch:host:<name>``, ...      short sections (host capacity, ...)
=====  =========  ===============================  =====================================

Rules (guarantee 2), enforced here like Linux's lockdep, in production as in tests:

* Callers *declare* every lock they need: a worker's handler as data beside it (``Declared``,
  ``{Level.VM: [...], Level.OTHER: [...]}``, Ganeti's ``needed_locks``), taken by
  ``LockManager.hold_declared``; ``LockManager.hold`` takes them level by level, by name within a
  level, and releases them in reverse order in ``finally``.
* A function that relies on a held lock says so with ``# LOCK:`` and checks it with ``require()``.
* A context may only take locks that sort after every lock it already holds, as
  ``(level, name)``. Anything else -- a higher level, an earlier name in the same level,
  or a lock already held -- raises ``LockOrderError`` before touching Redis.
* Every lock has an expiry and is renewed by this module's own renewal thread (the
  library's auto-renewal thread dies silently on error). ``Holding.check()`` raises
  ``LockLost`` when a renewal found the lock gone, and ``LeaseExpired`` once the holder can no
  longer know the lock is its own: holders call it before each side effect.
* The lease (guarantee 6): a holder counts its lock as its own for ``lease_seconds(expire)``
  from the moment it *sent* its last successful acquisition or renewal, by its own monotonic
  clock, with no Redis round trip. Redis set the key's expiry when it ran that command, which
  was after the send, so the round trip is inside the count, not in the margin. The margin
  (``expire * CLOCK_RATE_DRIFT + LEASE_MARGIN_S``) covers the rate difference between this
  host's clock and Redis's, the step between a check and the libvirt call it guards, and that
  call's own time: another holder can only take the lock once Redis expired it, at least
  ``margin`` after this holder's lease ended. With the default 10 s expiry the lease is 8.9 s
  and a renewal is sent every 3.3 s, so one lost renewal costs nothing.
* While locks are held, every Redis call of the holding context is bounded by the lease
  (``redisconn.bounded_by``): its socket timeouts and retries end when the lease does, with
  ``LeaseExpired``, so no call under a lock can outlive it. Renewals are bounded too.
* Every acquisition takes a fencing token from a per-lock counter that only goes up;
  fenced writes (``orchestrator.store``) are refused once a newer token exists.
* No lock is held while waiting for another job or host: a holder only ever waits for
  locks that sort after its own.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

import redis_lock
from redis.exceptions import RedisError

from orchestrator.model import metrics
from orchestrator.model.errors import LeaseExpired, LockError, LockLost, LockOrderError, LockTimeout
from orchestrator.store import keys
from orchestrator.store.jobstore import Fence
from orchestrator.store.redisconn import bounded_by, budget, connect_for_locks

log = logging.getLogger(__name__)

# Delete a lock only if it still has the id we judged dead, and wake its waiters at once
# (the same wake-up python-redis-lock sends on release). KEYS: lock key, signal key; ARGV: id
_CLEAR_IF_OWNED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('LPUSH', KEYS[2], 1)
  redis.call('PEXPIRE', KEYS[2], 1000)
  return 1
end
return 0
"""

# Take a free lock and its fencing token in one round trip (python-redis-lock's own acquire is
# a GET and a SET NX, and the token another INCR). The key, id and expiry are the library's,
# so its release and extend work on the lock unchanged. KEYS: lock key, fence key; ARGV: id, expire (s)
_ACQUIRE_FENCED = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
"""

# Raise a lock's fencing counter to at least ARGV[1] (it only ever goes up). KEYS: fence key
_RAISE_FENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return current
"""

#: a waiter re-tries at least this often, so it sees a dead holder's expired lock within
#: expiry + this, not after a whole second BLPOP of the expiry (the library's default)
WAIT_SLICE_S = 1

#: the lease's margin, relative: clock rate drift between a host and Redis (NTP slews at most 0.05 %)
CLOCK_RATE_DRIFT = 0.01
#: the lease's margin, absolute (s): a check to its libvirt call, and that call's own time
LEASE_MARGIN_S = 1.0
#: renewals per expiry: a renewal is sent every ``expire / RENEWALS_PER_EXPIRY`` seconds
RENEWALS_PER_EXPIRY = 3
#: the most a release may take (s); past it the lock expires by itself
RELEASE_BUDGET_S = 2.0


def lease_seconds(expire: float) -> float:
    """How long after sending a successful acquisition or renewal a holder may act (see the module)."""
    return expire * (1 - CLOCK_RATE_DRIFT) - LEASE_MARGIN_S


class Level(IntEnum):
    CMD = 1
    VMS = 2
    VM = 3
    OTHER = 4


@dataclass(frozen=True, order=True)
class LockName:
    level: Level
    name: str

    def __str__(self) -> str:
        return self.name


def cmd_lock(namespace: str) -> LockName:
    return LockName(Level.CMD, f"{keys.PREFIX}:cmd:{namespace}")


def vms_lock(namespace: str) -> LockName:
    return LockName(Level.VMS, f"{keys.PREFIX}:vms:{namespace}")


def vm_lock(namespace: str, vm: str) -> LockName:
    return LockName(Level.VM, f"{keys.PREFIX}:vm:{namespace}:{vm}")


def host_lock(host: str) -> LockName:
    return LockName(Level.OTHER, f"{keys.PREFIX}:host:{host}")


def other_lock(name: str) -> LockName:
    return LockName(Level.OTHER, f"{keys.PREFIX}:{name}")


# What the current context (thread, or asyncio task) holds, in acquisition order.
_held: contextvars.ContextVar[tuple[LockName, ...]] = contextvars.ContextVar("vmorch_held_locks", default=())


def _log_fields(name: LockName) -> dict[str, str]:
    return {"lock": name.name, "lock_level": name.level.name.lower()}


def held() -> tuple[LockName, ...]:
    return _held.get()


def require(*names: LockName) -> None:
    """For internal functions that assume locks (minimega's ``// LOCK:`` made checkable).

    Cheap: it reads this context's held set, no Redis round trip. Raises ``LockOrderError`` if one is not held.
    """
    current = _held.get()
    for name in names:
        if name not in current:
            raise LockOrderError(f"{name} must be held here", hint="call the exported function that takes it")


#: the locks one handler needs, by level (Ganeti's ``needed_locks``): ``{Level.VM: [vm_lock(ns, vm)], ...}``
Declared = Mapping[Level, Sequence[LockName]]


def declared_names(declared: Declared) -> list[LockName]:
    """The declared locks in the order they are taken: level by level, names sorted within a level."""
    names: set[LockName] = set()
    for level, at_level in declared.items():
        for name in at_level:
            if name.level is not level:
                raise LockOrderError(f"{name} is a lock of level {name.level.name.lower()}, declared at "
                                     f"{Level(level).name.lower()}", hint="declare each lock at its own level")
            names.add(name)
    return sorted(names)


def check_order(wanted: list[LockName]) -> None:
    """Raise ``LockOrderError`` unless ``wanted`` (sorted) may be taken after what is held."""
    current = _held.get()
    if not current or not wanted:
        return
    top = max(current)
    first = wanted[0]
    if first <= top:
        why = "is already held" if first in current else f"sorts before {top} ({top.level.name.lower()}), which is held"
        raise LockOrderError(
            f"lock order violation: {first} ({first.level.name.lower()}) {why}",
            hint="declare every lock up front; the hierarchy is cmd > vms > vm > other, names sorted",
        )


@dataclass(eq=False)
class HeldLock:
    name: LockName
    lock: redis_lock.Lock
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


class LockManager:
    """Takes and renews locks for one process. Thread-safe; the held set is per context."""

    def __init__(self, redis_url: str, *, owner: str | None = None, expire: int = 10) -> None:
        self.client = connect_for_locks(redis_url)
        self.expire = int(expire)
        if lease_seconds(self.expire) <= 0:
            raise ValueError(f"a lock expiry of {expire}s leaves no lease after its margin")
        #: lock ids are "<owner>:<pid>:<random>" so a restarted worker can tell its dead processes' locks
        self.owner = owner or socket.gethostname()
        self._renewing: set[HeldLock] = set()
        self._renewing_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        self._acquire_fenced = self.client.register_script(_ACQUIRE_FENCED)
        self._raise_fence = self.client.register_script(_RAISE_FENCE)

    def lock_id(self) -> str:
        return f"{self.owner}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    @contextmanager
    def hold(self, *names: LockName, timeout: float,
             on_wait: Callable[[], None] | None = None) -> Iterator[Holding]:
        """Take ``names`` in hierarchy order, yield, release in reverse -- even on error.

        ``on_wait`` is called once, before the first wait for a lock that is taken (not at all
        when every lock was free).
        """
        wanted = sorted(set(names))
        check_order(wanted)
        taken: list[HeldLock] = []
        first: contextvars.Token[tuple[LockName, ...]] | None = None
        try:
            deadline = time.monotonic() + timeout
            for name in wanted:
                taken.append(self._acquire(name, deadline, on_wait))
                if taken[-1].waited:
                    on_wait = None
                token = _held.set((*_held.get(), name))
                first = first or token
            holding = Holding(tuple(taken), self.expire)
            if not taken:
                yield holding
            else:
                # LOCK: no Redis call of this context outlives the lease of what it holds (guarantee 6)
                with bounded_by(holding.lease_remaining):
                    yield holding
        finally:
            # Release in reverse; a lost lock is logged, never allowed to hide the original error.
            # A release has its own short budget: it may come after the lease ended, and if Redis
            # can't be reached the lock expires by itself.
            with bounded_by(budget(min(RELEASE_BUDGET_S, self.expire / 2)), nested=False):
                for h in reversed(taken):
                    self._release(h)
            if first is not None:
                _held.reset(first)  # back to what was held before this hold()

    @contextmanager
    def hold_declared(self, declared: Declared, *, timeout: float,
                      on_wait: Callable[[], None] | None = None) -> Iterator[Holding]:
        """Take what a handler declares (``Declared``), level by level, and release it in reverse.

        A declared lock this context holds already is checked, not taken again: the runner holds a
        VM's lock for its whole mailbox, and each job's handler declares it too. The locks still to
        take must sort after everything held (``check_order``).
        """
        current = set(_held.get())
        with self.hold(*(n for n in declared_names(declared) if n not in current), timeout=timeout,
                       on_wait=on_wait) as holding:
            yield holding

    def _acquire(self, name: LockName, deadline: float, on_wait: Callable[[], None] | None) -> HeldLock:
        lock = redis_lock.Lock(self.client, name.name, expire=self.expire, id=self.lock_id())
        started = sent = time.monotonic()
        token = self._try_acquire(lock, name)
        waited = token is None
        if waited and on_wait is not None:
            on_wait()
        while token is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                metrics.lock_timed_out(name.level.name.lower())
                owner = lock.get_owner_id()
                raise LockTimeout(f"timed out waiting for lock {name} (held by {owner})",
                                  hint="another operation holds it for long; see 'vmorch job list --state running'")
            # As python-redis-lock waits: a releaser pushes to the signal list; an expired lock pushes
            # nothing, hence the slice.
            self.client.blpop([keys.lock_signal(name.name)], timeout=min(WAIT_SLICE_S, max(remaining, 0.01)))
            sent = time.monotonic()
            token = self._try_acquire(lock, name)
        # The lease counts from the send: Redis set the key's expiry after that.
        held_lock = HeldLock(name, lock, Fence(keys.fence(name.name), token), sent, waited=waited)
        metrics.lock_acquired(name.level.name.lower(), held_lock.acquired_at - started)
        log.debug("took lock %s (fence %d) after %.3fs", name, held_lock.fence.token, held_lock.acquired_at - started,
                  extra=_log_fields(name))
        self._start_renewing(held_lock)
        return held_lock

    def _try_acquire(self, lock: redis_lock.Lock, name: LockName) -> int | None:
        """The fencing token if the lock was free and is now ours, else None."""
        token = self._acquire_fenced(keys=[keys.lock_key(name.name), keys.fence(name.name)],
                                     args=[lock.id, self.expire])
        return None if token is None else int(token)

    def _release(self, h: HeldLock) -> None:
        with self._renewing_lock:
            self._renewing.discard(h)
        metrics.lock_released(h.name.level.name.lower(), time.monotonic() - h.acquired_at)
        try:
            h.lock.release()
        except redis_lock.NotAcquired:
            log.warning("lock %s was lost before release (%s)", h.name, h.lost or "expired", extra=_log_fields(h.name))
        except (RedisError, LeaseExpired) as exc:
            # The lock expires on its own; a release failure must not mask the caller's error.
            log.warning("could not release lock %s: %s", h.name, exc, extra=_log_fields(h.name))

    def raise_fence(self, name: LockName, at_least: int) -> int:
        """Make the fencing counter of ``name`` at least ``at_least``; returns the counter.

        For a token seen where only a holder of ``name`` writes (a domain's metadata) that is
        higher than the counter: Redis lost the counter's last increments (a restart that lost
        writes). Raising it only makes held tokens stale sooner, which is always safe.
        """
        return int(self._raise_fence(keys=[keys.fence(name.name)], args=[int(at_least)]))

    # -- renewal ------------------------------------------------------------------------

    def _start_renewing(self, h: HeldLock) -> None:
        with self._renewing_lock:
            self._renewing.add(h)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_loop, name="vmorch-lock-renewer", daemon=True)
                self._renewer.start()

    def _renew_loop(self) -> None:
        interval = self.expire / RENEWALS_PER_EXPIRY
        while not self._stop.wait(interval):
            with self._renewing_lock:
                current = list(self._renewing)
            for h in current:
                self._renew(h, interval)

    def _renew(self, h: HeldLock, interval: float) -> None:
        for attempt in range(3):
            sent = time.monotonic()
            try:
                # Bounded: a renewal stuck in a partition must not hold up the next one (nor the other locks').
                with bounded_by(budget(interval), nested=False):
                    h.lock.extend()
            except redis_lock.NotAcquired:
                h.lost = "taken over or expired before renewal"
                with self._renewing_lock:
                    self._renewing.discard(h)
                return
            except (RedisError, LockError) as exc:
                log.warning("renewing lock %s failed (attempt %d): %s", h.name, attempt + 1, exc,
                            extra=_log_fields(h.name))
                if h not in self._renewing:
                    return  # released meanwhile
                time.sleep(0.2 * (attempt + 1))
                continue
            h.renewed_at = max(h.renewed_at, sent)
            return
        # Still unrenewed: Holding.check() raises LeaseExpired once the lease runs out.

    def clear_dead_holders(self, is_alive: Callable[[int], bool]) -> list[str]:
        """Free the locks of this owner's processes that are gone, instead of waiting for expiry.

        A worker calls this at start: its owner id names its host and machine, so the
        process ids in its lock ids are ones it can check. Returns the freed lock names.
        """
        clear = self.client.register_script(_CLEAR_IF_OWNED)
        freed = []
        for key in self.client.scan_iter(f"lock:{keys.PREFIX}:*", count=1000):
            lock_id = str(self.client.get(key) or "")
            parts = lock_id.rsplit(":", 2)
            if len(parts) != 3 or parts[0] != self.owner or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid == os.getpid() or is_alive(pid):
                continue
            name = str(key).removeprefix("lock:")
            if clear(keys=[key, keys.lock_signal(name)], args=[lock_id]):
                log.warning("freed lock %s of dead process %s", name, pid)
                freed.append(name)
        return freed

    def close(self) -> None:
        self._stop.set()
        self.client.close()
