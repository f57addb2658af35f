"""Fixtures: a real redis-server on a free loopback port, real Celery workers as hosts.

Nothing is faked. Each test gets a namespace of its own; at its end the fixture deletes
the VMs it left (through ordinary jobs), then asserts the keyspace: every job final, no
lock held, no mailbox left, and no key of the namespace beyond the documented ones.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis

from orchestrator.model.names import expand_target
from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import HostState
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import keys, layout
from orchestrator.store.jobstore import BatchEntry, Submitted

from .apiserver import ApiServer, serve
from .guest import guest_image  # noqa: F401  (a fixture: one bootable test image, shared by every guest test)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: object, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RedisServer:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    #: more redis-server arguments (they override the defaults above them), e.g. ("--maxmemory-policy", "allkeys-lru")
    extra: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: run scripts/install.sh")
        self.dir.mkdir(parents=True, exist_ok=True)
        # AOF on, as in the embedded cluster and compose: restarts lose no accepted job.
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
             "--logfile", str(self.dir / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        try:
            wait_until(lambda: _pings(client), what=f"redis-server on port {self.port}")
        except AssertionError:
            self.stop()  # not left running behind a failed start
            raise
        finally:
            client.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    # As the first client of a new cluster would: tests that write through the store's scripts
    # directly (test_scripts.py) must not leave a Redis that looks like an older, unversioned one.
    with Redis(host="127.0.0.1", port=server.port) as first:
        layout.check(first)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_settings(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(redis_url=redis_server.url, home=tmp_path_factory.mktemp("home"), lock_expire=4,
                    heartbeat_interval=0.5, host_down_after=3.0, host_down_deadline=4.0, wait_poll_interval=0.5)


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMORCH_")}
    if settings.api_url:  # the CLI then talks to the HTTP API instead of Redis
        env.update({"VMORCH_API_URL": settings.api_url, "VMORCH_TOKEN": settings.token or ""})
    env.update({
        "VMORCH_REDIS_URL": settings.resolved_redis_url(), "VMORCH_HOME": str(settings.home),
        "VMORCH_LOCK_EXPIRE": str(settings.lock_expire), "VMORCH_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
        "VMORCH_HOST_DOWN_AFTER": str(settings.host_down_after),
        "VMORCH_HOST_DOWN_DEADLINE": str(settings.host_down_deadline), "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclass
class WorkerProc:
    host: str
    libvirt_uri: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_worker(settings: Settings, host: str, libvirt_uri: str = "test:///default", *,
                 concurrency: int = 4, env: dict[str, str] | None = None, args: list[str] | None = None) -> WorkerProc:
    log = settings.home / f"{host}-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PYTHON, "-m", "worker", "--host", host, "--libvirt-uri", libvirt_uri,
             "--concurrency", str(concurrency), "--loglevel", "INFO", *(args or [])],
            cwd=ROOT, env={**settings_env(settings), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
        )
    return WorkerProc(host, libvirt_uri, proc, log)


def wait_hosts_up(settings: Settings, *workers: WorkerProc, timeout: float = 30) -> None:
    client = RedisClient(settings)

    def up() -> bool:
        for w in workers:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker {w.host} exited with {w.proc.returncode}:\n{w.log_tail()}")
        states = {h.name: h for h in client.hosts()}
        return all(w.host in states and states[w.host].state is HostState.UP and states[w.host].pid == w.proc.pid
                   for w in workers)

    wait_until(up, timeout=timeout, what=f"hosts {[w.host for w in workers]} up")


@contextmanager
def running_hosts(settings: Settings, *workers: WorkerProc) -> Iterator[list[WorkerProc]]:
    """The workers, once their hosts are up; stopped at the end whatever happens."""
    try:
        wait_hosts_up(settings, *workers)
        yield list(workers)
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="session")
def cluster(base_settings: Settings) -> Iterator[list[WorkerProc]]:
    """Two hosts, each a real Celery worker with its own libvirt test hypervisor."""
    with running_hosts(base_settings, start_worker(base_settings, "t1"), start_worker(base_settings, "t2")) as ws:
        yield ws


@pytest.fixture(scope="session")
def api_server(base_settings: Settings, cluster: list[WorkerProc]) -> Iterator[ApiServer]:
    """The HTTP API over the session's cluster, in a thread of this process (see tests/apiserver.py)."""
    with serve(base_settings) as api:
        yield api


_ns_counter = itertools.count(1)


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> str:
    return f"t{os.getpid() % 10000}-{next(_ns_counter)}"


@pytest.fixture
def settings(base_settings: Settings, ns: str) -> Settings:
    return base_settings.model_copy(update={"namespace": ns})


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[Redis]:
    # no socket timeout: tests BLPOP on barriers for longer than redis-py's default 5 s
    client = Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=None)
    yield client
    client.close()


@pytest.fixture
def client(settings: Settings, redis: Redis) -> Iterator[RedisClient]:
    """A client in the test's namespace; at the end, the namespace is cleaned and its keyspace asserted."""
    before = set(redis.scan_iter("*"))
    c = RedisClient(settings)
    yield c
    cleanup_namespace(c, redis, settings.namespace, before=before)


def cleanup_namespace(c: RedisClient, redis: Redis, namespace: str, *, before: set[str] | None = None) -> None:
    ids = [int(i) for i in redis.zrange(keys.jobs(namespace), 0, -1)]
    if ids:
        leftover = [j for j in c.wait(ids, timeout=60) if not j.state.final]
        assert not leftover, f"jobs never finished: {leftover}"
    names = c.store.vm_names(namespace)
    if names and any(h.state is HostState.UP for h in c.hosts()):
        jobs = c.submit([Operation.build(Op.DELETE, namespace, n) for n in names])
        done = c.wait([j.id for j in jobs], timeout=60)
        assert all(j.state.final for j in done), done
    assert_keyspace_clean(redis, namespace)
    if before is not None:
        assert_no_stray_keys(redis, namespace, before)
    # The namespace's jobs go with its index: a job record no index names would be a leak.
    for job_id in redis.zrange(keys.jobs(namespace), 0, -1):
        redis.delete(keys.job(int(job_id)), keys.job_children(int(job_id)), keys.job_dependents(int(job_id)),
                     keys.job_history(int(job_id)))
    for key in redis.scan_iter(f"*{namespace}*"):
        redis.delete(key)


def wait_unlocked(redis: Redis, namespace: str, within: float = 2.0) -> list[str]:
    """The namespace's lock keys still there after up to ``within`` seconds.

    A worker publishes a job's final state under the VM lock and releases the lock just after,
    so a lock may outlive a wait for the job by a moment; a leaked one stays until its expiry.
    """
    deadline = time.monotonic() + within
    while (locks := [k for k in redis.scan_iter("lock:*") if f":{namespace}" in k]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return locks


def assert_keyspace_clean(redis: Redis, namespace: str) -> None:
    """After a test: no lock held, no unfinished job, nothing but history left of the namespace."""
    locks = wait_unlocked(redis, namespace)
    assert not locks, f"lock keys left behind: {locks}"
    for job_id in redis.zrange(keys.jobs(namespace), 0, -1):
        state = redis.hget(keys.job(int(job_id)), "state")
        assert state in ("succeeded", "failed", "canceled"), f"job {job_id} left {state}"
    allowed = (f"{keys.PREFIX}:jobs:{namespace}", f"{keys.PREFIX}:fence:", f"{keys.PREFIX}:job:",
               keys.events(namespace), keys.namespace(namespace), keys.runs(namespace),
               keys.prune_lease(namespace))  # a janitor pruning the namespace's old jobs at this moment
    for key in redis.scan_iter(f"*{namespace}*"):
        # a VM's sequence counter and its history outlive the VM (the history until retention)
        if key.startswith(allowed) or (key.startswith(f"{keys.PREFIX}:vm:{namespace}:")
                                       and key.endswith((":seq", ":history"))):
            continue
        if image_history_kept(redis, key):  # an image named after the test's namespace, still in the catalog
            continue
        if key.startswith("lock-signal:"):  # python-redis-lock's wake-up list; expires within 1 s
            continue
        raise AssertionError(f"unexpected key left behind: {key} ({redis.type(key)})")


#: keys any test may leave outside its namespace, and why they stay
_SHARED_KEYS = (
    keys.JOB_NEXT, keys.RUN_NEXT, keys.NAMESPACES,  # counters and the namespace set: cluster-wide by design
    keys.HOSTS, keys.LAYOUT, keys.AUDIT,  # the hosts that ever registered, the layout version
    keys.NET_VNI_NEXT,  # the last VNI handed out: VNIs are not reused
    "_kombu.binding", "unacked", "host.", "vmorch.schedules",  # Celery's broker keys (its own)
    keys.REDBEAT_PREFIX + ":",  # RedBeat's due-time index and its scheduler lock (its own)
    f"{keys.PREFIX}:idem:",  # submissions' idempotency keys: they expire (keys.IDEMPOTENCY_TTL)
    # the image catalog (cluster-wide), and the history of image jobs (namespace ``_images``: no user's)
    keys.IMAGES, keys.image(""), keys.jobs(keys.IMAGES_NS), keys.events(keys.IMAGES_NS),
)


def image_history_kept(redis: Redis, key: str) -> bool:
    """Whether ``key`` is an image's own history while the image is in the catalog: it goes with the
    image's record (``keys.image_history``), so a removed image's left behind is a leak."""
    prefix, suffix = keys.image_history(""), ":history"
    name = key[len(prefix) - len(suffix):-len(suffix)] if key.endswith(suffix) else ""
    return bool(name) and key == keys.image_history(name) and bool(redis.exists(keys.image(name)))


def assert_no_stray_keys(redis: Redis, namespace: str, before: set[str]) -> None:
    """Every key the test created, in the whole database, is accounted for: the namespace's own
    (checked by ``assert_keyspace_clean``), its jobs' records, fencing counters (they must only
    grow), a host's registration, or a shared key above."""
    own_jobs = {int(i) for i in redis.zrange(keys.jobs(namespace), 0, -1)}
    own = {keys.run(int(i)) for i in redis.zrange(keys.runs(namespace), 0, -1)}
    stray = []
    for key in set(redis.scan_iter("*")) - before:
        if namespace in key or key in own or key.startswith(_SHARED_KEYS) or key.startswith(keys.fence("")):
            continue
        if image_history_kept(redis, key):
            continue
        if key.startswith(keys.JOB_PREFIX):
            job_id = key[len(keys.JOB_PREFIX):].split(":")[0]
            if job_id.isdigit() and (int(job_id) in own_jobs or redis.zscore(keys.jobs(keys.IMAGES_NS), job_id)):
                continue  # the test's jobs, or image jobs (the catalog's, filed under ``_images``)
        if key.startswith(keys.HOST_PREFIX) and redis.sismember(keys.HOSTS, key[len(keys.HOST_PREFIX):].split(":")[0]):
            continue
        if key.startswith("lock-signal:"):  # python-redis-lock's wake-up list; expires within 1 s
            continue
        if key.startswith(keys.token("")) and str(redis.hget(key, "name") or "").startswith(namespace):
            continue  # the test's own API tokens (named after its namespace): the API fixture revokes them
        kind = redis.type(key)
        stray.append(f"{key} ({kind}: {redis.hgetall(key) if kind == 'hash' else '...'})")
    assert not stray, f"keys the test left outside its namespace: {sorted(stray)}"


def accept(client: RedisClient, op: Operation) -> Submitted:
    """Accept one job without sending its wake-up: the test sends it itself, in the order it wants."""
    _, [submitted] = client.store.submit_batch([BatchEntry(op)])
    return submitted


def ops(op: Op, namespace: str, target: str, **params: object) -> list[Operation]:
    return [Operation.build(op, namespace, n, **params) for n in expand_target(target)]


def run_cli(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``vmorch`` command in a subprocess, as a user runs it."""
    return subprocess.run([PYTHON, "-m", "cli", "--namespace", settings.namespace, *args], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True, timeout=timeout)

