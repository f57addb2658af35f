"""The lock hierarchy: the only module that imports ``redis_lock``.

``LockManager`` (here) takes, renews and releases the locks; the levels, lock names and order
checks are in ``lockhierarchy``, the lease and ``Holding`` in ``locklease``. Every name of the
three is importable from here.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis_lock
from redis.exceptions import RedisError

from orchestrator.model import metrics
from orchestrator.model.errors import LeaseExpired, LockError, LockTimeout
from orchestrator.store import keys
from orchestrator.store.jobstore import Fence
from orchestrator.store.redisconn import bounded_by, budget, connect_for_locks

from .lockhierarchy import (
    Declared,
    Level,
    LockName,
    _held,
    _log_fields,
    check_order,
    cmd_lock,
    declared_names,
    held,
    host_lock,
    other_lock,
    require,
    vm_lock,
    vms_lock,
)
from .locklease import CLOCK_RATE_DRIFT, LEASE_MARGIN_S, HeldLock, Holding, lease_seconds

__all__ = [
    "CLOCK_RATE_DRIFT", "LEASE_MARGIN_S", "RELEASE_BUDGET_S", "RENEWALS_PER_EXPIRY", "WAIT_SLICE_S", "Declared",
    "HeldLock", "Holding", "Level", "LockManager", "LockName", "check_order", "cmd_lock", "declared_names", "held",
    "host_lock", "lease_seconds", "other_lock", "require", "vm_lock", "vms_lock",
]

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

#: renewals per expiry: a renewal is sent every ``expire / RENEWALS_PER_EXPIRY`` seconds
RENEWALS_PER_EXPIRY = 3
#: the most a release may take (s); past it the lock expires by itself
RELEASE_BUDGET_S = 2.0


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
