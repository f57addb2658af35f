"""``<home>/supervisor.lock``: one supervisor per home, and which one it is."""

from __future__ import annotations

import fcntl
import os
import time

from orchestrator.localcluster.home import Paths
from orchestrator.localcluster.processes import Recorded, start_ticks
from orchestrator.localcluster.state import load_state
from orchestrator.model.errors import AlreadyExists, ClusterUnavailable


class HomeLock:
    """An flock on ``<home>/supervisor.lock``, held for the supervisor's whole life.

    The kernel drops it however the holder dies, so "is a cluster running here?" never
    has a stale answer; the file's content ("<pid> <start ticks>") says who holds it.
    """

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.fd: int | None = None

    def __enter__(self) -> HomeLock:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        # A prober (_lock_holder) holds a shared lock for an instant: only a lock held for a
        # while means another supervisor.
        for attempt in range(10):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 9:
                    os.close(fd)
                    raise already_running(self.paths) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {start_ticks(os.getpid()) or ''}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (unlinking it would race a new holder)
            self.fd = None


def already_running(paths: Paths) -> AlreadyExists:
    return AlreadyExists(f"a local cluster is already running under {paths.home}", hint="stop it with 'vmorch down'")


def running_supervisor(paths: Paths) -> Recorded | None:
    """The supervisor of the cluster under this home, or None when none runs."""
    holder = _lock_holder(paths)
    if holder is not None:
        return holder
    state = load_state(paths)
    if state is not None:
        supervisor = state.supervisor()
        if supervisor.alive():
            return supervisor
    return None


def _lock_holder(paths: Paths) -> Recorded | None:
    """The supervisor holding the home's lock, or None when no supervisor runs."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(paths)
    else:
        return None
    finally:
        os.close(fd)


def _read_holder(paths: Paths) -> Recorded:
    # The holder writes its PID right after taking the lock; until then the file is empty
    # or names the previous, dead holder. Give it a moment.
    for _ in range(20):
        parts = paths.lock.read_text().split()
        if parts:
            holder = Recorded(f"supervisor (pid {parts[0]})", int(parts[0]), int(parts[1]) if len(parts) > 1 else None)
            if holder.alive():
                return holder
        time.sleep(0.05)
    raise ClusterUnavailable(f"{paths.lock} is locked but names no process",
                             hint="wait a moment and retry, or check the processes running vmorch")
