"""Helpers several test modules share: processes of a test's own (a libvirtd, a QEMU worker, a Redis,
any command), each stopped at the end whatever happens."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.settings import Settings

from .conftest import ROOT, RedisServer, WorkerProc, free_port, start_worker, wait_hosts_up, wait_until


def qemu_pids(root: Path) -> list[int]:
    """PIDs of QEMU processes started from this embedded root (they outlive the worker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(root).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@contextmanager
def qemu_worker(settings: Settings, host: str, root: Path, *, up_within: float = 60, remove_root: bool = True,
                env: dict[str, str] | None = None) -> Iterator[WorkerProc]:
    """A worker (concurrency 2) on libvirt's embedded QEMU driver under ``root``, once its host is up.
    At the end it is stopped, ``root`` removed (unless ``remove_root`` is false), and any QEMU process
    of ``root`` still there is killed and fails the test."""
    worker = start_worker(settings, host, f"qemu:///embed?root={root}", concurrency=2, env=env)
    try:
        wait_hosts_up(settings, worker, timeout=up_within)
        yield worker
    finally:
        worker.stop()
        leftover = qemu_pids(root)
        for pid in leftover:  # don't leave them running even when the assertion below fails
            os.kill(pid, signal.SIGKILL)
        if remove_root:
            shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"QEMU processes outlived the test: {leftover}"


@contextmanager
def private_libvirtd(prefix: str, qemu_conf: str = "") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real libvirtd of the test's own (private mount namespace, own socket, no virtlogd): its
    qemu:///system URI and its process. ``qemu_conf``: more lines for its qemu.conf. Skips the test
    without root, libvirtd or unshare."""
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/libvirtd") or shutil.which("unshare") is None:
        pytest.skip("needs root, libvirtd and unshare")
    d = Path(f"/tmp/{prefix}{uuid.uuid4().hex[:8]}")  # the socket path must stay short
    for sub in ("etc", "lib", "run", "log", "cache"):
        (d / sub).mkdir(parents=True)
    (d / "etc" / "libvirtd.conf").write_text(f'auth_unix_rw = "none"\nhost_uuid = "{uuid.uuid4()}"\n'
                                             f'log_outputs = "3:file:{d}/log/libvirtd.log"\n')
    (d / "etc" / "qemu.conf").write_text('user = "root"\ngroup = "root"\nsecurity_driver = "none"\n' + qemu_conf)
    binds = " && ".join(f"mkdir -p {target} && mount --bind {d / sub} {target}" for sub, target in (
        ("etc", "/etc/libvirt"), ("lib", "/var/lib/libvirt"), ("run", "/var/run/libvirt"),
        ("cache", "/var/cache/libvirt")))
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"{binds} && exec /usr/sbin/libvirtd -p /var/run/libvirt/libvirtd.pid "
                             f"-f /etc/libvirt/libvirtd.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (d / "run" / "libvirt-sock").exists(), timeout=30, what="libvirtd's socket")
        yield f"qemu:///system?socket={d}/run/libvirt-sock", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def private_redis(directory: Path, *extra: str) -> Iterator[RedisServer]:
    """A redis-server of the test's own (the session's settings, ``extra`` arguments on top), stopped at the end."""
    server = RedisServer(free_port(), directory, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def redis_url_pings(url: str) -> bool:
    """Whether a Redis answers at ``url`` (with the password and TLS settings the URL gives)."""
    try:
        with Redis.from_url(url, socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except Exception:
        return False


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A command run from the repository's root, its output in ``log``; SIGTERMed at the end (SIGKILLed
    after 20 s)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
