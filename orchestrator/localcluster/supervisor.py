"""The supervisor: the one process that owns a local cluster's Redis, host workers and scheduler."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from redis.exceptions import RedisError

from orchestrator.localcluster.api import LOCAL_ADMIN, api_argv, ensure_admin_token
from orchestrator.localcluster.environment import OnEvent, child_env, redis_server, resolved
from orchestrator.localcluster.home import Paths, prepare_home
from orchestrator.localcluster.homelock import HomeLock
from orchestrator.localcluster.processes import Child, describe_exit, start_ticks, tail, wait_dead
from orchestrator.localcluster.readiness import hosts_up
from orchestrator.localcluster.state import ClusterHost, ClusterInfo, State, write_state
from orchestrator.localcluster.stopping import stop_all
from orchestrator.localcluster.timeouts import BACKOFF_MAX, BACKOFF_MIN, POLL, REDIS_START_TIMEOUT, STABLE_AFTER
from orchestrator.model.errors import ClusterUnavailable, InvalidInput
from orchestrator.model.settings import Settings
from orchestrator.store.redisconn import connect, redact

SCHEDULER_STOP_TIMEOUT = 15.0
#: when Redis fsyncs its append-only file. "always": before it answers (the writes of one event-loop
#: turn share one fsync), so a job a client was told was accepted survives a power loss of the machine;
#: "everysec" is cheaper and can lose the last second of them. VMORCH_REDIS_APPENDFSYNC relaxes it.
APPENDFSYNC_ENV = "VMORCH_REDIS_APPENDFSYNC"
APPENDFSYNC_DEFAULT = "always"
APPENDFSYNC_CHOICES = ("always", "everysec", "no")


def redis_appendfsync() -> str:
    """The local cluster's Redis ``appendfsync``: always, unless VMORCH_REDIS_APPENDFSYNC says otherwise."""
    value = os.environ.get(APPENDFSYNC_ENV, "").strip().lower() or APPENDFSYNC_DEFAULT
    if value not in APPENDFSYNC_CHOICES:
        raise InvalidInput(f"{APPENDFSYNC_ENV}={value!r} is not an appendfsync setting",
                           hint=f"use one of {', '.join(APPENDFSYNC_CHOICES)}, or unset it "
                                f"(default: {APPENDFSYNC_DEFAULT})")
    return value


class Supervisor:
    """Runs Redis and the host workers until SIGTERM/SIGINT; restarts what crashes."""

    def __init__(self, settings: Settings, hosts: Sequence[tuple[str, str]], *, api_port: int | None = None,
                 on_event: OnEvent = print) -> None:
        self.settings = resolved(settings)
        self.paths = Paths(self.settings.home)
        self.plan = list(hosts)
        #: None: a free port, so that several local clusters (tests) live side by side
        self.api_port = api_port
        self.api: Child | None = None
        self.on_event = on_event
        self.started_at = datetime.now(UTC)
        self.redis_url = ""
        self.redis: Child | None = None
        self.workers: dict[str, Child] = {}  # host name -> its worker, in plan order
        self.scheduler: Child | None = None  # 'vmorch scheduler': fires the schedules
        self._stop_requested = False
        self._stopped_by: str | None = None  # the signal that asked us to stop
        self._announced = False
        self._next_ready_check = 0.0

    # -- lifecycle --

    def run(self) -> ClusterInfo:
        redis_server()
        redis_appendfsync()
        prepare_home(self.paths)
        with HomeLock(self.paths):
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
        self.on_event(f"local cluster running under {self.paths.home}: Redis at {redact(self.redis_url)}, "
                      f"hosts {hosts}; API at {self._info().api_url}; logs in {self.paths.logs}")

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
        env = child_env(self.settings, VMORCH_REDIS_URL=self.redis_url)
        if ensure_admin_token(self.redis_url, self.paths.token):
            self.on_event(f"made the admin token {LOCAL_ADMIN!r} in {self.paths.token}")
        self.api_port = self.api_port or _free_port()
        self.api = Child("API", api_argv(self.api_port), env, self.paths.logs / "api.log", self.paths.home)
        self.api.start()
        for name, uri in self.plan:
            # The hosts share this machine: each offers an equal part of it, so placement sees equal hosts.
            # One kernel holds every host's bridges: their underlay is loopback (VXLAN never leaves it).
            argv = [sys.executable, "-m", "worker", "--host", name, "--libvirt-uri", uri,
                    "--share", str(len(self.plan)), "--underlay", "127.0.0.1"]
            child = Child(f"{name} worker", argv, env, self.paths.host_log(name), self.paths.home)
            child.start()
            self.workers[name] = child
        self.scheduler = Child("scheduler", [sys.executable, "-m", "cli", "scheduler"], env,
                               self.paths.logs / "scheduler.log", self.paths.home)
        self.scheduler.start()
        self._save()

    def _start_redis(self) -> None:
        log = self.paths.logs / "redis.log"
        # Loopback is shared by every local user: a password (in a 0600 file, never on a command
        # line others can read in ps) keeps them from the cluster's Redis, and so from its tokens.
        password = secrets.token_urlsafe(24)
        conf = self.paths.redis_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {password}\n")
        os.chmod(conf, 0o600)  # an older file keeps its mode through O_CREAT
        for _attempt in range(3):  # a free port can be taken between probing and binding: try a few
            port = _free_port()
            argv = [redis_server(), str(conf), "--bind", "127.0.0.1", "--port", str(port),
                    "--dir", str(self.paths.redis_dir),
                    "--appendonly", "yes", "--appendfsync", redis_appendfsync(), "--save", "", "--daemonize", "no",
                    "--logfile", str(log)]
            self.redis = Child("redis-server", argv, child_env(self.settings), log, self.paths.home)
            self.redis.start()
            self.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
            if self._wait_redis(self.redis):
                return
        raise ClusterUnavailable(f"redis-server did not start; last lines of {log}:\n{tail(log)}",
                                 hint="see the log above")

    def _wait_redis(self, redis: Child) -> bool:
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

    def _children(self) -> list[Child]:
        return ([self.redis] if self.redis else []) + ([self.api] if self.api else []) + \
            list(self.workers.values()) + ([self.scheduler] if self.scheduler else [])

    def _check(self, child: Child) -> bool:
        """Notice a crash and restart after a backoff; True when the child was restarted now."""
        now = time.monotonic()
        if child.restart_at is None:
            code = child.exit_code()
            if code is None:
                return False
            if now - child.started >= STABLE_AFTER:
                child.backoff = BACKOFF_MIN
            child.restart_at = now + child.backoff
            self.on_event(f"{child.name} (pid {child.pid}) exited ({describe_exit(code)}); "
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
        if hosts_up(self.redis_url, expected, self.settings.host_down_after) == set(expected):
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
                           scheduler_pid=self.scheduler.pid if self.scheduler and self.scheduler.proc else None,
                           api_port=self.api_port, logs=self.paths.logs,
                           api_url=f"http://127.0.0.1:{self.api_port}" if self.api else None,
                           api_pid=self.api.pid if self.api else None)

    def _save(self) -> None:
        ticks = {p.pid: p.ticks for p in self._children()}
        ticks[os.getpid()] = start_ticks(os.getpid())
        write_state(self.paths, State(self._info(), ticks))

    # -- stopping --

    def _stop(self) -> None:
        self._stop_requested = True
        if self._stopped_by:
            self.on_event(f"{self._stopped_by}: stopping the local cluster")
        if self.scheduler is not None:  # first: it may be submitting jobs to the workers
            self.scheduler.signal(signal.SIGTERM)
            if not wait_dead([self.scheduler], SCHEDULER_STOP_TIMEOUT):
                self.scheduler.signal(signal.SIGKILL)
                wait_dead([self.scheduler], 5)
        started = [(name, uri) for name, uri in self.plan if name in self.workers]
        front = [self.api, *self.workers.values()] if self.api else list(self.workers.values())
        stop_all(self.settings, front, started, self.redis_url, self.redis, self.on_event)
        self.paths.state.unlink(missing_ok=True)
        self.on_event("local cluster stopped")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
