"""The embedded local cluster behind ``vmorch up`` / ``vmorch down``.

One *supervisor* process owns everything it starts: a private ``redis-server`` on a free
loopback port and one worker per host (``python -m worker --host hostK``). It restarts
what crashes, keeps ``<home>/cluster.json`` current (that file is how every other
``vmorch`` command with the same ``VMORCH_HOME`` finds the cluster), and on SIGTERM or
SIGINT stops everything in reverse order: workers, their QEMU domains, Redis.

Files under ``<home>``:

* ``cluster.json``     -- URLs and PIDs of the running cluster; written atomically, removed on stop.
* ``supervisor.lock``  -- flock held by the supervisor for its whole life; holds "<pid> <start ticks>".
* ``.vmorch-home``     -- marker: vmorch created this directory, so ``down --purge`` may delete it.
* ``logs/``, ``redis/`` (AOF), ``hosts/<name>/`` (embedded QEMU roots, disks).

Only processes this module started are ever signalled: PIDs are recorded together with
their start time (``/proc/<pid>/stat``), so a recycled PID is never mistaken for ours.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.exceptions import RedisError

from .errors import AlreadyExists, ClusterUnavailable, InvalidInput, VmorchError
from .records import HostState, VmState
from .redisconn import connect
from .settings import Settings
from .store import Store

OnEvent = Callable[[str], None]

TEST_URI = "test:///default"
CLUSTER_FILE = "cluster.json"
LOCK_FILE = "supervisor.lock"
MARKER_FILE = ".vmorch-home"

READY_TIMEOUT = 60.0  # up --detach: every host must heartbeat within this
DOWN_TIMEOUT = 60.0  # down: the supervisor must have stopped everything within this
WORKER_STOP_TIMEOUT = 20.0  # Celery's warm shutdown finishes running operations first
REDIS_START_TIMEOUT = 10.0
DOMAINS_STOP_TIMEOUT = 60.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
STABLE_AFTER = 30.0  # a child that ran this long restarts with the minimum backoff again
POLL = 0.25
MAX_EMBED_ROOT = 50  # characters; see default_libvirt_uri

_NO_REDIS_HINT = "install it: apt-get install redis-server (or run scripts/install.sh)"
# The code this module is part of: children must import the same orchestrator/worker packages.
_CODE_ROOT = Path(__file__).resolve().parent.parent


# -- public model -----------------------------------------------------------------------


class ClusterHost(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    libvirt_uri: str
    pid: int
    restarts: int = 0


class ClusterInfo(BaseModel):
    """The running local cluster, as recorded in ``<home>/cluster.json``."""

    model_config = ConfigDict(frozen=True)

    home: Path
    redis_url: str
    redis_pid: int
    supervisor_pid: int
    hosts: tuple[ClusterHost, ...]
    started_at: datetime
    #: recorded only: issue 5 adds the HTTP API process that will listen on it
    api_port: int | None = None
    logs: Path


# -- public functions -------------------------------------------------------------------


def default_libvirt_uri(home: Path, host: str) -> tuple[str, str | None]:
    """The hypervisor of a local host: embedded QEMU when it can run here, else libvirt's test driver."""
    fallback = "using libvirt's test driver (no real VMs)"
    root = Path(home).expanduser().resolve() / "hosts" / host / "libvirt"
    if shutil.which("qemu-system-x86_64") is None:
        return TEST_URI, f"qemu-system-x86_64 not found: {fallback}; install qemu-system-x86 for real VMs"
    if not _user_exists("libvirt-qemu"):
        # libvirt's embedded QEMU driver resolves its compiled-in default user before it
        # reads qemu.conf, so it refuses to open without this account even as root.
        return TEST_URI, (f"system user libvirt-qemu not found (embedded QEMU needs it): {fallback}; "
                          "run scripts/install.sh as root to create it")
    if len(str(root)) > MAX_EMBED_ROOT:
        # QEMU's monitor socket lives at <root>/lib/qemu/domain-<id>-<name, 20 chars>/monitor.sock
        # and a UNIX socket path has at most 107 bytes: every VM would fail to start.
        return TEST_URI, (f"{root} is too long for QEMU's UNIX sockets ({len(str(root))} > {MAX_EMBED_ROOT} "
                          f"characters): {fallback}; set VMORCH_HOME to a shorter path for real VMs")
    return f"qemu:///embed?root={root}", None


def up(settings: Settings, *, hosts: int = 2, libvirt_uri: str | None = None, api_port: int | None = None,
       detach: bool = False, on_event: OnEvent = print) -> ClusterInfo:
    """Start a local cluster under ``settings.home``.

    Foreground (``detach=False``): supervise in this process until SIGINT/SIGTERM, then stop
    everything and return. Detached: start the supervisor as its own session and return once
    every host heartbeats.
    """
    if hosts < 1:
        raise InvalidInput(f"--hosts must be at least 1, not {hosts}")
    _redis_server()
    settings = _resolved(settings)
    paths = _Paths(settings.home)
    _prepare_home(paths)
    _refuse_if_running(settings, paths, on_event)
    plan = _plan_hosts(settings.home, hosts, libvirt_uri, on_event)
    if not detach:
        return Supervisor(settings, plan, api_port=api_port, on_event=on_event).run()
    return _start_detached(settings, paths, plan, api_port, on_event)


def down(settings: Settings, *, purge: bool = False, on_event: OnEvent = print) -> None:
    """Stop the local cluster under ``settings.home``; with ``purge``, delete its directory too."""
    settings = _resolved(settings)
    paths = _Paths(settings.home)
    supervisor = _running_supervisor(paths)
    if supervisor is not None:
        _stop_supervisor(settings, paths, supervisor, on_event)
    elif paths.state.exists():
        on_event(f"cleaning up after a local cluster under {paths.home} that did not stop cleanly")
        _stop_leftovers(settings, paths, on_event)
    else:
        on_event(f"no local cluster is running under {paths.home}")
    if purge:
        _purge(paths, on_event)


def status(settings: Settings) -> ClusterInfo | None:
    """The running local cluster under ``settings.home``, or None."""
    paths = _Paths(_resolved(settings).home)
    if _running_supervisor(paths) is None:
        return None
    state = _load_state(paths)
    return state.info if state else None


# -- processes --------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


class _Process(Protocol):
    name: str

    def alive(self) -> bool: ...
    def signal(self, sig: signal.Signals) -> None: ...


# up(detach=True) keeps its supervisor's Popen so that this process can reap it when it
# exits (a zombie would look alive) and Python doesn't warn about a lost child.
_SPAWNED: list[subprocess.Popen[bytes]] = []


def _reap_spawned() -> None:
    _SPAWNED[:] = [p for p in _SPAWNED if p.poll() is None]


@dataclass
class _Recorded:
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
class _Child:
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
            log.write(f"--- {_now().isoformat()} starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # Its own process group: the terminal's Ctrl-C reaches only the supervisor, which
            # then stops the children in order (workers before Redis).
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.cwd, process_group=0)
        self.ticks = _start_ticks(self.proc.pid)
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


def _wait_dead(procs: Sequence[_Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _terminate(procs: Sequence[_Process], timeout: float, on_event: OnEvent) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left."""
    live = [p for p in procs if p.alive()]
    for proc in live:
        proc.signal(signal.SIGTERM)
    if _wait_dead(live, timeout):
        return
    for proc in live:
        if proc.alive():
            on_event(f"{proc.name} did not stop within {timeout:.0f}s: killing it")
            proc.signal(signal.SIGKILL)
    _wait_dead(live, 5.0)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# -- files under home -------------------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    home: Path

    @property
    def state(self) -> Path:
        return self.home / CLUSTER_FILE

    @property
    def lock(self) -> Path:
        return self.home / LOCK_FILE

    @property
    def marker(self) -> Path:
        return self.home / MARKER_FILE

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.log"

    def host_log(self, host: str) -> Path:
        return self.logs / f"{host}.log"


@dataclass(frozen=True)
class _State:
    """cluster.json: the public ClusterInfo plus the start ticks that prove a PID is still ours."""

    info: ClusterInfo
    ticks: Mapping[int, int | None]

    def proc(self, name: str, pid: int) -> _Recorded:
        return _Recorded(name, pid, self.ticks.get(pid))

    def workers(self) -> list[_Recorded]:
        return [self.proc(f"{h.name} worker (pid {h.pid})", h.pid) for h in self.info.hosts]

    def redis(self) -> _Recorded:
        return self.proc(f"redis-server (pid {self.info.redis_pid})", self.info.redis_pid)


def _write_state(paths: _Paths, state: _State) -> None:
    data = state.info.model_dump(mode="json")
    data["proc_start_ticks"] = {str(pid): ticks for pid, ticks in state.ticks.items()}
    # Readers (every vmorch command) must never see a half-written file: write, then rename.
    tmp = paths.state.with_name(f".{CLUSTER_FILE}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, paths.state)


def _load_state(paths: _Paths) -> _State | None:
    """cluster.json, or None when it is missing or unreadable (then nothing in it can be trusted)."""
    try:
        data = json.loads(paths.state.read_text())
        info = ClusterInfo.model_validate(data)
        ticks = {int(pid): t for pid, t in data.get("proc_start_ticks", {}).items()}
    except (OSError, ValueError, ValidationError, AttributeError):
        return None
    return _State(info, ticks)


def _prepare_home(paths: _Paths) -> None:
    # The marker goes only into a directory vmorch creates (or finds empty): 'down --purge'
    # deletes a directory only if it carries it, never one the user pointed us at.
    fresh = not paths.home.exists() or not any(paths.home.iterdir())
    for directory in (paths.home, paths.logs, paths.redis_dir):
        directory.mkdir(parents=True, exist_ok=True)
    if fresh:
        paths.marker.write_text("created by 'vmorch up'; 'vmorch down --purge' deletes this directory\n")


def _purge(paths: _Paths, on_event: OnEvent) -> None:
    if not paths.home.exists():
        return
    if not paths.marker.exists():
        raise InvalidInput(f"not deleting {paths.home}: vmorch did not create it (no {MARKER_FILE} in it)",
                           hint="delete what you don't need in it yourself")
    shutil.rmtree(paths.home)
    on_event(f"deleted {paths.home}")


class _HomeLock:
    """An flock on ``<home>/supervisor.lock``, held for the supervisor's whole life.

    The kernel drops it however the holder dies, so "is a cluster running here?" never
    has a stale answer; the file's content says who holds it.
    """

    def __init__(self, paths: _Paths) -> None:
        self.paths = paths
        self.fd: int | None = None

    def __enter__(self) -> _HomeLock:
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
                    raise _already_running(self.paths) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {_start_ticks(os.getpid()) or ''}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (unlinking it would race a new holder)
            self.fd = None


def _lock_holder(paths: _Paths) -> _Recorded | None:
    """The supervisor holding the home's lock, or None when no supervisor runs."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(paths)
        return None
    finally:
        os.close(fd)


def _read_holder(paths: _Paths) -> _Recorded:
    # The holder writes its PID right after taking the lock; until then the file is empty
    # or names the previous, dead holder. Give it a moment.
    for _ in range(20):
        parts = paths.lock.read_text().split()
        if parts:
            holder = _Recorded(f"supervisor (pid {parts[0]})", int(parts[0]), int(parts[1]) if len(parts) > 1 else None)
            if holder.alive():
                return holder
        time.sleep(0.05)
    raise ClusterUnavailable(f"{paths.lock} is locked but names no process",
                             hint="wait a moment and retry, or check the processes running vmorch")


def _running_supervisor(paths: _Paths) -> _Recorded | None:
    holder = _lock_holder(paths)
    if holder is not None:
        return holder
    state = _load_state(paths)
    if state is not None:
        supervisor = state.proc(f"supervisor (pid {state.info.supervisor_pid})", state.info.supervisor_pid)
        if supervisor.alive():
            return supervisor
    return None


def _already_running(paths: _Paths) -> AlreadyExists:
    return AlreadyExists(f"a local cluster is already running under {paths.home}", hint="stop it with 'vmorch down'")


def _refuse_if_running(settings: Settings, paths: _Paths, on_event: OnEvent) -> None:
    if _running_supervisor(paths) is not None:
        raise _already_running(paths)
    if paths.state.exists():
        on_event(f"cleaning up after a local cluster under {paths.home} that did not stop cleanly")
        _stop_leftovers(settings, paths, on_event)


# -- environment ------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _resolved(settings: Settings) -> Settings:
    # Children run in another cwd and embedded QEMU roots must be absolute.
    return settings.model_copy(update={"home": Path(settings.home).expanduser().resolve()})


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ClusterUnavailable("redis-server not found", hint=_NO_REDIS_HINT)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child: this process's, plus ``settings`` as VMORCH_* variables.

    ``settings`` may have been built from keywords (tests, the CLI's options), which a child
    would not see otherwise.
    """
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if name != "redis_url" and value is not None:
            env[f"VMORCH_{name.upper()}"] = str(value)
    env.pop("VMORCH_REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_CODE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _plan_hosts(home: Path, count: int, libvirt_uri: str | None, on_event: OnEvent) -> list[tuple[str, str]]:
    """(name, libvirt URI) of each host. A given URI serves every host: test:///default keeps
    its state per process, so each worker is still its own hypervisor."""
    if libvirt_uri and _is_embedded(libvirt_uri) and count > 1:
        # libvirt locks an embedded root to the one process that opened it.
        raise InvalidInput(f"{count} hosts cannot share one embedded QEMU root ({libvirt_uri})",
                           hint="omit --libvirt-uri: each host then gets an embedded root of its own")
    plan = []
    warned: set[str] = set()
    for k in range(1, count + 1):
        name = f"host{k}"
        if libvirt_uri:
            plan.append((name, libvirt_uri))
            continue
        uri, warning = default_libvirt_uri(home, name)
        if warning and warning not in warned:
            on_event(f"warning: {warning}")
            warned.add(warning)
        plan.append((name, uri))
    return plan


def _hosts_up(redis_url: str, expected: Mapping[str, int], down_after: float) -> set[str]:
    """The hosts of ``expected`` (name -> worker pid) that heartbeat from that very worker."""
    try:
        with connect(redis_url, retries=0) as client:
            hosts = Store(client, host_down_after=down_after).hosts()
    except (RedisError, OSError):
        return set()
    # A host record survives its worker (AOF): only a heartbeat from the current pid counts.
    return {h.name for h in hosts if h.state is HostState.UP and expected.get(h.name) == h.pid}


# -- stopping ---------------------------------------------------------------------------


def _is_embedded(uri: str) -> bool:
    return uri.startswith("qemu:///embed")


def _destroy_domains(settings: Settings, hosts: Sequence[tuple[str, str]], on_event: OnEvent) -> None:
    """Power off the QEMU domains of embedded hosts, whose workers have exited.

    QEMU processes outlive their worker. Definitions are persistent and stay, so the next
    ``up`` finds the VMs shut off. libvirt allows one embedded root per process for the
    process's lifetime, so each host gets a short-lived helper process of its own.
    """
    helpers = []
    for name, uri in hosts:
        if _is_embedded(uri):
            argv = [sys.executable, "-m", "orchestrator.localcluster", "destroy-domains", "--host", name,
                    "--libvirt-uri", uri]
            helpers.append((name, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, env=_child_env(settings),
                                                   cwd=settings.home)))
    for name, helper in helpers:
        try:
            out, err = helper.communicate(timeout=DOMAINS_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            helper.kill()
            out, err = helper.communicate()
        count = out.decode(errors="replace").strip()
        if helper.returncode != 0:
            on_event(f"could not stop the QEMU domains of {name}: {err.decode(errors='replace').strip()[-2000:]}")
        elif count != "0":
            on_event(f"{name}: powered off {count} running VM(s)")


def _stop_redis(url: str, redis: _Process, on_event: OnEvent) -> None:
    if not redis.alive():
        return
    try:
        # SHUTDOWN flushes and fsyncs the AOF before exiting: nothing accepted is lost.
        with connect(url, retries=0) as client:
            client.shutdown()
    except (RedisError, OSError) as exc:
        on_event(f"Redis SHUTDOWN failed ({exc}): sending SIGTERM")
    if not _wait_dead([redis], 10.0):
        _terminate([redis], 5.0, on_event)


def _stop_all(settings: Settings, workers: Sequence[_Process], hosts: Sequence[tuple[str, str]],
              redis_url: str, redis: _Process | None, on_event: OnEvent) -> None:
    """Stop a cluster's processes in reverse order of need: workers, QEMU, Redis."""
    _terminate(workers, WORKER_STOP_TIMEOUT, on_event)
    _destroy_domains(settings, hosts, on_event)
    if redis is not None:
        _stop_redis(redis_url, redis, on_event)


def _stop_leftovers(settings: Settings, paths: _Paths, on_event: OnEvent) -> None:
    """Stop what a dead supervisor left running (by recorded PIDs), then forget it."""
    state = _load_state(paths)
    if state is not None:
        hosts = [(h.name, h.libvirt_uri) for h in state.info.hosts]
        _stop_all(settings, state.workers(), hosts, state.info.redis_url, state.redis(), on_event)
    paths.state.unlink(missing_ok=True)


def _stop_supervisor(settings: Settings, paths: _Paths, supervisor: _Recorded, on_event: OnEvent) -> None:
    on_event(f"stopping the local cluster under {paths.home} (supervisor pid {supervisor.pid})")
    supervisor.signal(signal.SIGTERM)
    if not _wait_dead([supervisor], DOWN_TIMEOUT):
        on_event(f"the supervisor did not stop within {DOWN_TIMEOUT:.0f}s: killing it and what it started")
        supervisor.signal(signal.SIGKILL)
        _wait_dead([supervisor], 5.0)
    # A supervisor that stopped cleanly removed cluster.json; otherwise its children may still run.
    _stop_leftovers(settings, paths, on_event)
    on_event("local cluster stopped")


# -- the supervisor ---------------------------------------------------------------------


class Supervisor:
    """Runs Redis and the host workers until SIGTERM/SIGINT; restarts what crashes."""

    def __init__(self, settings: Settings, hosts: Sequence[tuple[str, str]], *, api_port: int | None = None,
                 on_event: OnEvent = print) -> None:
        self.settings = _resolved(settings)
        self.paths = _Paths(self.settings.home)
        self.plan = list(hosts)
        # Issue 5 adds the HTTP API process; until then the port is only recorded in cluster.json.
        self.api_port = api_port
        self.on_event = on_event
        self.started_at = _now()
        self.redis_url = ""
        self.redis: _Child | None = None
        self.workers: dict[str, _Child] = {}  # host name -> its worker, in plan order
        self._stop_requested = False
        self._stopped_by: str | None = None  # the signal that asked us to stop
        self._announced = False
        self._next_ready_check = 0.0

    # -- lifecycle --

    def run(self) -> ClusterInfo:
        _redis_server()
        _prepare_home(self.paths)
        with _HomeLock(self.paths):
            previous = self._trap_signals()
            try:
                self._start()
                self._announce_start()
                while not self._stop_requested:
                    self._tick()
                    time.sleep(POLL)
            finally:
                self._stop()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return self._info()

    def _announce_start(self) -> None:
        if self._stop_requested:
            return
        hosts = ", ".join(f"{name} (pid {child.pid})" for name, child in self.workers.items())
        self.on_event(f"local cluster running under {self.paths.home}: Redis at {self.redis_url}, hosts {hosts}; "
                      f"logs in {self.paths.logs}")

    def _trap_signals(self) -> dict[signal.Signals, Any]:
        # Python only lets the main thread set handlers; elsewhere the caller uses request_stop().
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only set flags: printing here could re-enter a print the main loop is in the middle of.
        self._stopped_by = self._stopped_by or signal.Signals(signum).name
        self._stop_requested = True

    def request_stop(self) -> None:
        self._stop_requested = True

    # -- starting --

    def _start(self) -> None:
        self._start_redis()
        if self._stop_requested:
            return
        env = _child_env(self.settings, VMORCH_REDIS_URL=self.redis_url)
        for name, uri in self.plan:
            argv = [sys.executable, "-m", "worker", "--host", name, "--libvirt-uri", uri]
            child = _Child(f"{name} worker", argv, env, self.paths.host_log(name), self.paths.home)
            child.start()
            self.workers[name] = child
        self._save()

    def _start_redis(self) -> None:
        log = self.paths.logs / "redis.log"
        # A free port can be taken between probing and binding: try a few.
        for _attempt in range(3):
            port = _free_port()
            argv = [_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.paths.redis_dir),
                    "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                    "--logfile", str(log)]
            self.redis = _Child("redis-server", argv, _child_env(self.settings), log, self.paths.home)
            self.redis.start()
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            if self._wait_redis(self.redis):
                return
        raise ClusterUnavailable(f"redis-server did not start; last lines of {log}:\n{_tail(log)}",
                                 hint="see the log above")

    def _wait_redis(self, redis: _Child) -> bool:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        with connect(self.redis_url, retries=0) as client:
            while time.monotonic() < deadline and not self._stop_requested:
                if redis.exit_code() is not None:
                    return False
                with contextlib.suppress(RedisError, OSError):
                    client.ping()
                    return True
                time.sleep(0.05)
        if self._stop_requested:
            return True  # _stop() takes it from here
        raise ClusterUnavailable(f"redis-server did not answer within {REDIS_START_TIMEOUT:.0f}s",
                                 hint=f"see {redis.log}")

    # -- running --

    def _tick(self) -> None:
        changed = False
        for child in self._children():
            changed |= self._check(child)
        if changed:
            self._save()
        self._announce_ready()

    def _children(self) -> list[_Child]:
        return ([self.redis] if self.redis else []) + list(self.workers.values())

    def _check(self, child: _Child) -> bool:
        """Notice a crash and restart after a backoff; True when the child was restarted now."""
        now = time.monotonic()
        if child.restart_at is None:
            code = child.exit_code()
            if code is None:
                return False
            if now - child.started >= STABLE_AFTER:
                child.backoff = BACKOFF_MIN
            child.restart_at = now + child.backoff
            self.on_event(f"{child.name} (pid {child.pid}) exited ({_describe_exit(code)}); "
                          f"restarting in {child.backoff:.0f}s; see {child.log}")
            child.backoff = min(child.backoff * 2, BACKOFF_MAX)
            return False
        if now < child.restart_at:
            return False
        child.start()
        child.restarts += 1
        self.on_event(f"restarted {child.name} (pid {child.pid}, restart {child.restarts})")
        return True

    def _announce_ready(self) -> None:
        if self._announced or time.monotonic() < self._next_ready_check:
            return
        self._next_ready_check = time.monotonic() + 1.0
        expected = {name: child.pid for name, child in self.workers.items()}
        if _hosts_up(self.redis_url, expected, self.settings.host_down_after) == set(expected):
            self.on_event(f"all {len(expected)} hosts up")
            self._announced = True

    # -- state --

    def _info(self) -> ClusterInfo:
        assert self.redis is not None
        hosts = tuple(ClusterHost(name=name, libvirt_uri=uri, pid=self.workers[name].pid,
                                  restarts=self.workers[name].restarts)
                      for name, uri in self.plan if name in self.workers)
        return ClusterInfo(home=self.paths.home, redis_url=self.redis_url, redis_pid=self.redis.pid,
                           supervisor_pid=os.getpid(), hosts=hosts, started_at=self.started_at,
                           api_port=self.api_port, logs=self.paths.logs)

    def _save(self) -> None:
        ticks = {p.pid: p.ticks for p in self._children()}
        ticks[os.getpid()] = _start_ticks(os.getpid())
        _write_state(self.paths, _State(self._info(), ticks))

    # -- stopping --

    def _stop(self) -> None:
        self._stop_requested = True
        if self._stopped_by:
            self.on_event(f"{self._stopped_by}: stopping the local cluster")
        started = [(name, uri) for name, uri in self.plan if name in self.workers]
        _stop_all(self.settings, list(self.workers.values()), started, self.redis_url, self.redis, self.on_event)
        self.paths.state.unlink(missing_ok=True)
        self.on_event("local cluster stopped")


# -- detached start ---------------------------------------------------------------------


def _start_detached(settings: Settings, paths: _Paths, plan: Sequence[tuple[str, str]], api_port: int | None,
                    on_event: OnEvent) -> ClusterInfo:
    argv = [sys.executable, "-m", "orchestrator.localcluster", "supervise"]
    for name, uri in plan:
        argv += ["--host", f"{name}={uri}"]
    if api_port is not None:
        argv += ["--api-port", str(api_port)]
    with paths.supervisor_log.open("ab") as log:
        # A session of its own: it survives this process and the terminal it runs in.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_child_env(settings), cwd=paths.home, start_new_session=True)
    _SPAWNED.append(proc)
    ticks = _start_ticks(proc.pid)
    on_event(f"started the supervisor (pid {proc.pid}); waiting for {len(plan)} hosts")
    try:
        return _wait_ready(settings, paths, proc)
    except ClusterUnavailable:
        # A cluster that failed to start must not linger. Only while the supervisor runs is
        # the home ours: one that exited early may have lost the lock to another cluster.
        if proc.poll() is None:
            _stop_supervisor(settings, paths, _Recorded(f"supervisor (pid {proc.pid})", proc.pid, ticks), on_event)
        raise


def _wait_ready(settings: Settings, paths: _Paths, proc: subprocess.Popen[bytes]) -> ClusterInfo:
    deadline = time.monotonic() + READY_TIMEOUT
    missing: list[str] = []
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise ClusterUnavailable(
                f"the local cluster's supervisor exited during start-up ({_describe_exit(code)}); "
                f"last lines of {paths.supervisor_log}:\n{_tail(paths.supervisor_log)}",
                hint=f"see the logs in {paths.logs}")
        state = _load_state(paths)
        if state is not None and state.info.supervisor_pid == proc.pid:
            expected = {h.name: h.pid for h in state.info.hosts}
            up_now = _hosts_up(state.info.redis_url, expected, settings.host_down_after)
            missing = sorted(set(expected) - up_now)
            if not missing:
                return state.info
        time.sleep(POLL)
    raise ClusterUnavailable(f"not up within {READY_TIMEOUT:.0f}s: {_not_up_report(paths, missing)}",
                             hint=f"see the logs in {paths.logs}")


def _not_up_report(paths: _Paths, missing: Sequence[str]) -> str:
    if not missing:
        return f"the supervisor did not record the cluster; last lines of {paths.supervisor_log}:\n" + \
            _tail(paths.supervisor_log)
    parts = [f"host {name} never heartbeat; last lines of {paths.host_log(name)}:\n{_tail(paths.host_log(name))}"
             for name in missing]
    return "\n".join(parts)


# -- ``python -m orchestrator.localcluster`` ---------------------------------------------


def _log_event(line: str) -> None:
    print(f"{_now().isoformat(timespec='seconds')} {line}", flush=True)


def _host_arg(value: str) -> tuple[str, str]:
    name, sep, uri = value.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"expected NAME=URI, got {value!r}")
    return name, uri


def _supervise(args: argparse.Namespace) -> int:
    Supervisor(Settings(), args.host, api_port=args.api_port, on_event=_log_event).run()
    return 0


def _destroy_domains_here(args: argparse.Namespace) -> int:
    """One embedded root per process: stop that root's running domains, print how many."""
    from worker.driver import Driver  # libvirt stays out of every other process of this module
    from worker.main import default_storage

    active = {VmState.RUNNING, VmState.PAUSED}
    driver = Driver(args.libvirt_uri, default_storage(_resolved(Settings()), args.host))
    try:
        running = [s.domain for s in driver.list_domains() if s.state in active]
        # Opening a root makes libvirt reconnect to surviving QEMUs in background threads; a
        # destroy racing that kills QEMU yet reports "not running". Trust the state, not the count.
        deadline = time.monotonic() + DOMAINS_STOP_TIMEOUT / 2
        while True:
            driver.destroy_all()
            left = [s.domain for s in driver.list_domains() if s.state in active]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    finally:
        driver.close()
    if left:
        print(f"still running: {', '.join(left)}", file=sys.stderr)
        return 1
    print(len(running), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.localcluster",
                                     description="internal entry points of 'vmorch up' (home: VMORCH_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)
    sup = sub.add_parser("supervise", help="run the supervisor in the foreground")
    sup.add_argument("--host", type=_host_arg, action="append", required=True, metavar="NAME=URI")
    sup.add_argument("--api-port", type=int)
    sup.set_defaults(func=_supervise)
    dom = sub.add_parser("destroy-domains", help="power off the running domains of one embedded QEMU root")
    dom.add_argument("--host", required=True)
    dom.add_argument("--libvirt-uri", required=True)
    dom.set_defaults(func=_destroy_domains_here)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except VmorchError as exc:
        _log_event(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        return 1


if __name__ == "__main__":
    sys.exit(main())
