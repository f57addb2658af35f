"""Starts what a benchmark needs (its own Redis, workers) and stops it by PID afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from orchestrator.model.records import HostState
from orchestrator.model.settings import Settings
from orchestrator.store.jobstore import Store

ROOT = Path(__file__).resolve().parent.parent
#: when the benchmarks' Redis fsyncs its AOF (``python -m bench --appendfsync``). everysec, as the
#: figures in docs/benchmarks.md were measured, though 'vmorch up' now runs always: D1 measures both.
APPENDFSYNC = "everysec"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Env:
    settings: Settings
    home: Path
    procs: list[subprocess.Popen[bytes]]
    #: keep the home (Redis's and the workers' logs) after the run, to look at a failure
    keep: bool = False

    @property
    def url(self) -> str:
        return self.settings.resolved_redis_url()

    def env(self, **extra: str) -> dict[str, str]:
        # Children run as installed: with their bytecode cached (a session may have turned that off).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("VMORCH_") and k != "PYTHONDONTWRITEBYTECODE"}
        env.update({"VMORCH_REDIS_URL": self.url, "VMORCH_HOME": str(self.home)})
        env.update(extra)
        return env

    def spawn(self, *argv: str, log: str) -> subprocess.Popen[bytes]:
        with (self.home / log).open("wb") as out:
            proc = subprocess.Popen(list(argv), cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def worker(self, host: str, uri: str = "test:///default", concurrency: int = 4) -> subprocess.Popen[bytes]:
        return self.spawn(sys.executable, "-m", "worker", "--host", host, "--libvirt-uri", uri,
                          "--concurrency", str(concurrency), "--loglevel", "WARNING", log=f"{host}.log")

    def bare_worker(self, queue: str, concurrency: int = 4) -> subprocess.Popen[bytes]:
        """A bare Celery worker with vmorch's app settings, pool and concurrency (the baseline)."""
        return self.spawn(sys.executable, "-m", "bench.bare_celery", queue, str(concurrency), log=f"{queue}.log")

    def wait_hosts(self, *hosts: str, timeout: float = 60) -> None:
        store = Store(Redis.from_url(self.url, decode_responses=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = {h.name for h in store.hosts() if h.state is HostState.UP}
            if set(hosts) <= up:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        raise RuntimeError(f"hosts {hosts} never came up; see logs in {self.home}")


@contextmanager
def environment(appendfsync: str | None = None) -> Iterator[Env]:
    """A fresh Redis (AOF on) in a temporary home; everything stopped after.

    ``appendfsync``: when Redis fsyncs the AOF (default ``APPENDFSYNC``; ``set_appendfsync``
    changes it on the fly).
    """
    home = Path(tempfile.mkdtemp(prefix="vmorch-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home), "--appendonly", "yes",
         "--appendfsync", appendfsync or APPENDFSYNC, "--save", "", "--logfile", str(home / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except Exception:
            time.sleep(0.05)
    client.close()
    env = Env(Settings(redis_url=url, home=home), home, [])
    try:
        yield env
    finally:
        for proc in reversed(env.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in env.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        redis_proc.terminate()
        redis_proc.wait()
        if env.keep or sys.exc_info()[0] is not None:
            print(f"logs kept in {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)


def set_appendfsync(url: str, value: str) -> None:
    """Change when Redis fsyncs its AOF (always / everysec / no), from the next write on."""
    client = Redis.from_url(url)
    try:
        client.config_set("appendfsync", value)
    finally:
        client.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class CommandCounter:
    """Redis commands executed in a window, from ``INFO commandstats`` (reset with CONFIG RESETSTAT)."""

    def __init__(self, url: str) -> None:
        self.redis = Redis.from_url(url, decode_responses=True)

    def reset(self) -> None:
        self.redis.config_resetstat()

    def count(self) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        # our own INFO call is not part of what is measured
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


@contextmanager
def monitored(url: str, log: Path) -> Iterator[Callable[[], tuple[int, int]]]:
    """Watch Redis with MONITOR; yields a function giving (commands sent by clients, commands run
    inside Lua scripts) so far. INFO commandstats counts both alike; MONITOR tells them apart.
    MONITOR slows Redis down: never around a timed window."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["redis-cli", "-u", url, "monitor"], stdout=out, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # MONITOR is on once redis-cli printed OK

    def counts() -> tuple[int, int]:
        time.sleep(0.3)  # let redis-cli write out what it has
        sent = inside = 0
        with log.open("rb") as f:
            for line in f:
                if b" [0 lua] " in line:
                    inside += 1
                elif line[:1].isdigit() and b'"monitor"' not in line:
                    sent += 1
        return sent, inside

    try:
        yield counts
    finally:
        proc.terminate()
        proc.wait()
