"""The processes a local cluster starts, and how they are signalled and waited for.

Only processes the local cluster started are ever signalled: PIDs are recorded together with
their start time (``/proc/<pid>/stat``), so a recycled PID is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from orchestrator.localcluster.environment import OnEvent
from orchestrator.localcluster.timeouts import BACKOFF_MIN


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


class Process(Protocol):
    name: str

    def alive(self) -> bool: ...
    def signal(self, sig: signal.Signals) -> None: ...


_spawned: list[subprocess.Popen[bytes]] = []


def keep_reaping(proc: subprocess.Popen[bytes]) -> None:
    """Reap ``proc`` when it exits, in this process's next liveness check.

    up(detach=True) keeps its supervisor's Popen so that this process can reap it when it
    exits (a zombie would look alive) and Python doesn't warn about a lost child.
    """
    _spawned.append(proc)


def _reap_spawned() -> None:
    _spawned[:] = [p for p in _spawned if p.poll() is None]


@dataclass
class Recorded:
    """A process known by a recorded PID: from cluster.json or the lock file, not our child."""

    name: str
    pid: int
    ticks: int | None

    def alive(self) -> bool:
        _reap_spawned()
        stat = _proc_stat(self.pid)
        if stat is None:
            return False
        state, ticks = stat
        # A zombie has exited; other start ticks mean the PID was recycled for someone else.
        return state not in "ZX" and (self.ticks is None or ticks == self.ticks)

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


@dataclass
class Child:
    """A process the supervisor runs and restarts: redis-server or one host's worker."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    ticks: int | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            log.write(f"--- {datetime.now(UTC).isoformat()} starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # Its own process group: the terminal's Ctrl-C reaches only the supervisor, which
            # then stops the children in order (workers before Redis).
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.cwd, process_group=0)
        self.ticks = start_ticks(self.proc.pid)
        self.started = time.monotonic()
        self.restart_at = None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)


def wait_dead(procs: Sequence[Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(procs: Sequence[Process], timeout: float, on_event: OnEvent) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left."""
    live = [p for p in procs if p.alive()]
    for proc in live:
        proc.signal(signal.SIGTERM)
    if wait_dead(live, timeout):
        return
    for proc in live:
        if proc.alive():
            on_event(f"{proc.name} did not stop within {timeout:.0f}s: killing it")
            proc.signal(signal.SIGKILL)
    wait_dead(live, 5.0)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a process's log."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
