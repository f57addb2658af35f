"""The serial console: ``vm console`` round-trips a line through a real guest (driven through a pty,
over Redis and over the API), one writer at a time, ``vm log --follow`` sees it live; and the
writer lease's rules against a real Redis."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.settings import Settings
from orchestrator.store import console, keys

from .apiserver import ApiServer, serve
from .conftest import PYTHON, ROOT, settings_env, wait_until
from .guestvm import BOOT_MARKER, GuestCluster, guest_cluster

VM = "c1"
IMAGE = f"cimg{os.getpid() % 10000}"


@pytest.fixture(scope="module")
def booted(base_settings: Settings, guest_image: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[GuestCluster]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    with guest_cluster(base_settings, tmp_path_factory.mktemp("console"), f"cons{os.getpid() % 10000}",
                       {"ch1": {"VMORCH_ACCEL": "tcg"}}) as cluster:
        cluster.import_image(IMAGE, guest_image)
        cluster.launch(VM, host="ch1", image=IMAGE)
        cluster.wait_console(VM, BOOT_MARKER)
        cluster.wait_console(VM, f"{VM}# ")  # the root shell on ttyS0
        yield cluster


@pytest.fixture(scope="module")
def api(base_settings: Settings) -> Iterator[ApiServer]:
    with serve(base_settings, name=f"console-admin-{os.getpid()}") as server:
        yield server


class Attached:
    """``vmorch vm console`` in a subprocess whose terminal is a pty this test types on."""

    def __init__(self, env: dict[str, str], namespace: str, vm: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([PYTHON, "-m", "cli", "--namespace", namespace, "vm", "console", vm],
                                     cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = 60.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]):
                raise AssertionError(f"{pattern!r} not seen within {timeout:g}s; the terminal shows:\n"
                                     f"{self.seen[-2000:].decode(errors='replace')}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: the process closed its end
                    time.sleep(0.1)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by PID: only the process this test started
        self.proc.wait(timeout=10)
        os.close(self.master)


def round_trip(env: dict[str, str], cluster: GuestCluster) -> None:
    word = f"hello-{secrets.randbelow(10**9)}"
    # A writer that was killed (an earlier test's, say) holds the lease until it expires (10 s)
    wait_until(lambda: not cluster.redis.get(keys.vm_console_writer(cluster.namespace, VM)), timeout=20,
               what="the console's writer lease to be free")
    follow = subprocess.Popen([PYTHON, "-m", "cli", "--namespace", cluster.namespace, "vm", "log", VM, "--follow"],
                              cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    attached = Attached(env, cluster.namespace, VM)
    try:
        attached.expect(rb"attached to c1's serial console; Ctrl-\] leaves")
        for _ in range(10):  # the shell's prompt (its host name is the VM's), once the shell reads ttyS0
            attached.type(b"\r")
            with contextlib.suppress(AssertionError):
                attached.expect(rb"\S+# ", timeout=5)
                break
        attached.type(f"echo {word}\r".encode())
        attached.expect(rb"\n" + word.encode() + rb"\r?\n")  # the command's output, not just its echo
        assert cluster.redis.get(keys.vm_console_writer(cluster.namespace, VM))  # the writer lease is held
        # someone else attaching meanwhile only watches
        other = subprocess.run([PYTHON, "-m", "cli", "--namespace", cluster.namespace, "vm", "console", VM],
                               cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert other.returncode == 0 and "read-only" in other.stderr, other.stderr
        attached.type(b"\x1d")  # Ctrl-]
        attached.expect(rb"left c1's console")
        assert attached.proc.wait(timeout=20) == 0
        assert cluster.redis.get(keys.vm_console_writer(cluster.namespace, VM)) is None
        # vm log --follow printed it as it came
        assert follow.stdout is not None
        os.set_blocking(follow.stdout.fileno(), False)
        got, deadline = b"", time.monotonic() + 30
        while word.encode() not in got and time.monotonic() < deadline:
            got += follow.stdout.read() or b""
            time.sleep(0.2)
        assert word.encode() in got
    finally:
        attached.close()
        follow.kill()  # by PID
        follow.wait(timeout=10)
        if follow.stdout is not None:
            follow.stdout.close()


@pytest.mark.qemu
@pytest.mark.slow
def test_console_round_trips_a_line_through_redis(booted: GuestCluster) -> None:
    round_trip(settings_env(booted.settings), booted)


@pytest.mark.qemu
@pytest.mark.slow
def test_console_and_log_through_the_api(booted: GuestCluster, api: ApiServer) -> None:
    settings = booted.settings.model_copy(update={"api_url": api.url, "token": api.admin_token})
    env = settings_env(settings)
    round_trip(env, booted)
    done = subprocess.run([PYTHON, "-m", "cli", "--namespace", booted.namespace, "vm", "log", VM, "--tail", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "hello-" in done.stdout and len(done.stdout.splitlines()) <= 3


def test_only_the_lease_holder_types(redis: Redis, ns: str) -> None:
    a, b = "session-a-" + secrets.token_hex(4), "session-b-" + secrets.token_hex(4)
    inbox = keys.vm_console_input(ns, "v1")
    try:
        assert not console.send(redis, ns, "v1", a, "x")  # no lease: nothing queued
        assert console.claim_writer(redis, ns, "v1", a)
        assert not console.claim_writer(redis, ns, "v1", b) and console.writer(redis, ns, "v1") == a
        assert console.send(redis, ns, "v1", a, "ls\r") and not console.send(redis, ns, "v1", b, "rm\r")
        assert redis.lrange(inbox, 0, -1) == ["ls\r"] and 0 < redis.pttl(inbox) <= keys.CONSOLE_INPUT_TTL_MS
        assert console.claim_writer(redis, ns, "v1", a)  # renewed
        console.release_writer(redis, ns, "v1", b)  # not b's to give back
        assert console.writer(redis, ns, "v1") == a
        console.release_writer(redis, ns, "v1", a)
        assert console.writer(redis, ns, "v1") is None and console.claim_writer(redis, ns, "v1", b)
    finally:
        redis.delete(inbox, keys.vm_console_writer(ns, "v1"))


def test_reading_and_tailing_the_stream(redis: Redis, ns: str) -> None:
    stream = keys.vm_console(ns, "v1")
    try:
        for text in ("boot\r\n", "line 2\r\nline 3\r\n", "prompt# "):
            redis.xadd(stream, {"d": text, "o": "0", "f": "h:1"})
        everything = console.read(redis, ns, "v1")
        assert everything.text == "boot\r\nline 2\r\nline 3\r\nprompt# "
        assert console.read(redis, ns, "v1", after=everything.entries[0][0]).text.startswith("line 2")
        assert console.read(redis, ns, "v1", after=everything.last).entries == []
        assert console.read(redis, ns, "v1", after="$", block_ms=50).entries == []
        tail = console.tail(redis, ns, "v1", lines=1)
        assert "".join(tail.text.splitlines(keepends=True)[-1:]) == "prompt# " and tail.last == everything.last
        assert console.tail(redis, ns, "v1", lines=10).text == everything.text
    finally:
        redis.delete(stream)


def test_the_relay_ships_the_log_resumes_after_a_restart_rotates_it_and_forgets(redis: Redis, ns: str,
                                                                                 tmp_path: Path) -> None:
    """``worker.console``'s output side on a plain file, as QEMU appends to it (no libvirt needed)."""
    from typing import Any, cast

    from worker.console import ConsoleRelay, _Console, forget, rotated

    log = tmp_path / f"{ns}.v1.console.log"
    stream = keys.vm_console(ns, "v1")

    def relay_and_console(log_max: int = 64) -> tuple[ConsoleRelay, _Console]:
        return ConsoleRelay(cast(Any, None), redis, "h1", log_max=log_max), _Console("uuid-1", ns, "v1", log, None)

    try:
        log.write_bytes("booting…\r\n".encode())
        relay, con = relay_and_console()
        relay._ship(con)
        with log.open("ab") as f:  # a character cut in two by the read: the decoder keeps its first half
            f.write("é".encode()[:1])
        relay._ship(con)
        with log.open("ab") as f:
            f.write("é".encode()[1:] + b" ok\r\n")
        relay._ship(con)
        assert console.read(redis, ns, "v1").text == "booting…\r\né ok\r\n"
        relay, con = relay_and_console()  # a restarted worker goes on after what the stream has
        with log.open("ab") as f:
            f.write(b"x" * 100 + b"\r\n")
        relay._ship(con)
        assert console.read(redis, ns, "v1").text == "booting…\r\né ok\r\n" + "x" * 100 + "\r\n"
        assert log.stat().st_size == 0 and rotated(log).stat().st_size > 64  # past log_max: rotated
        with log.open("ab") as f:
            f.write(b"after\r\n")
        relay._ship(con)
        assert console.read(redis, ns, "v1").text.endswith("x\r\nafter\r\n")
        forget(redis, ns, "v1", "uuid-1", log)  # the VM was deleted: nothing of it comes back
        assert not log.exists() and not rotated(log).exists() and not redis.exists(stream)
        log.write_bytes(b"late\r\n")
        relay._ship(con)
        assert not redis.exists(stream)
    finally:
        redis.delete(stream)
