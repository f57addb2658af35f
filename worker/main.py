"""The worker of one host: opens libvirt, registers the host, consumes ``host.<name>``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from celery import Celery

from orchestrator.control.locks import LockManager
from orchestrator.control.queue import enqueue, make_app
from orchestrator.model import logs, metrics
from orchestrator.model.settings import Settings
from orchestrator.store import keys, layout
from orchestrator.store.jobstore import Store
from orchestrator.store.redisconn import connect

from . import agent, disks, domxml, hostaccel, imagejobs, netsync, vmnet
from .console import ConsoleRelay
from .driver import Driver
from .guestwatch import GuestWatch
from .health import LibvirtProbe
from .heartbeat import Heartbeat
from .hostaccel import AccelProbe
from .janitor import Janitor
from .netsync import NetSync
from .reconcile import reconcile
from .runner import Worker
from .sync import DriftSync
from .tasks import register
from .vmnet import HostNet
from .watchdog import Watchdog

log = logging.getLogger(__name__)


def default_storage(settings: Settings, host: str) -> Path:
    return settings.home / "hosts" / host / "disks"


def run(settings: Settings, host: str, libvirt_uri: str, *, concurrency: int = 4,
        storage_dir: Path | None = None, loglevel: str = "INFO", labels: dict[str, str] | None = None,
        migrate_uri: str = "", shared_storage: bool = False, metrics_port: int = 0, task_events: bool = False,
        share: int = 1, underlay: str = "") -> None:
    """Run until SIGTERM/SIGINT. ``test:///default`` keeps its state in this process: never fork."""
    logs.bind_process(host=host)
    metrics.enable()
    accel_probe = AccelProbe(libvirt_uri).start()  # boots a probe guest: meanwhile, the rest starts
    url = settings.resolved_redis_url()
    store = Store(connect(url), host_down_after=settings.host_down_after)
    layout.check(store.redis)  # before libvirt and before the host registers: LayoutMismatch stops here
    sockets = agent.socket_dir(libvirt_uri)
    domxml.use_agent_socket_dir(sockets)  # before any domain is defined
    driver = Driver(libvirt_uri, storage_dir or default_storage(settings, host))
    disks.STORE_ROOM.host, disks.STORE_ROOM.margin_gib = host, settings.disk_margin_gib
    # The machine's name in the owner id makes the pids in this host's lock ids checkable here.
    locks = LockManager(url, owner=f"{host}@{socket.gethostname()}", expire=settings.lock_expire)
    watchdog = Watchdog(store, f"{host}:{os.getpid()}", settings.job_hard_time_limit)
    worker = Worker(settings, host, store, locks, driver, watchdog, blobs=connect(url, decode=False))
    app = worker.app = make_app(settings)
    app.conf.worker_send_task_events = task_events
    register(app, worker)
    imagejobs.register(app, worker)  # image jobs: their own task on this host's queue
    host_net = networking(settings, host, url, driver, underlay)
    net_sync = NetSync(host_net, locks, lock_timeout=settings.lock_wait_timeout) if host_net else None
    netsync.register(app, worker.blobs, net_sync)
    cpus, memory_mib = driver.capacity()
    # Hosts that share one machine (the local cluster) offer equal parts of it, so placement
    # sees equal hosts and spreads equal VMs evenly.
    cpus, memory_mib = max(1, cpus // share), max(1, memory_mib // share)
    probe = LibvirtProbe(driver, interval=max(1.0, settings.heartbeat_interval))
    accel = accel_probe.result()
    hostaccel.apply(driver, accel)
    heartbeat = Heartbeat(store, host, libvirt_uri=libvirt_uri, cpus=cpus, memory_mib=memory_mib,
                          interval=settings.heartbeat_interval, labels=labels, migrate_uri=migrate_uri,
                          shared_storage=shared_storage, status=probe.fields,
                          extra={"accel": accel.kind, "accel_reason": accel.reason,
                                 "underlay": host_net.underlay if host_net else ""},
                          storage_dir=driver.storage_dir)
    guests = driver.virt_type != "test"  # the test driver has no consoles and no agents
    relay = ConsoleRelay(driver, store.redis, host)
    guest_watch = GuestWatch(driver, store.redis, host, interval=max(2.0, settings.heartbeat_interval * 2))
    janitor = Janitor(worker, interval=max(1.0, settings.host_down_after / 2))
    drift_sync = DriftSync(worker, interval=settings.drift_sync_interval)
    try:
        # Repair first, then announce: a host that shows "up" has a registry that tells the truth.
        locks.clear_dead_holders(pid_alive)
        drift_sync.subscribe()  # before the repair: a change during it is an event to look at after
        reconcile(worker)
        drift_sync.start()
        if metrics_port:
            metrics.serve(metrics_port)
        probe.start()
        heartbeat.start()
        if guests:
            relay.start()
            guest_watch.start()
        if net_sync is not None:
            net_sync.start()
        kick_mailboxes(app, store, host)
        imagejobs.kick(app, worker)
        janitor.start()
        watchdog.start()
        consume(app, host, concurrency=concurrency, loglevel=loglevel)
    finally:
        if net_sync is not None:
            net_sync.stop()
        guest_watch.stop()
        relay.stop()
        if sockets is not None:
            with contextlib.suppress(OSError):  # still in use by a domain left running: it stays
                sockets.rmdir()
        drift_sync.stop()
        watchdog.stop()
        janitor.stop()
        heartbeat.stop()
        probe.stop()
        locks.close()
        driver.close()


def networking(settings: Settings, host: str, redis_url: str, driver: Driver, underlay: str) -> HostNet | None:
    """This host's side of vmorch networks: with real QEMU only (the test driver's domains plug into
    nothing), as root (bridges, VXLAN, nftables). The underlay defaults to the address this host
    reaches Redis from: the network every host of the cluster shares."""
    if driver.virt_type == "test" or os.geteuid() != 0:
        vmnet.configure(None)
        return None
    host_net = HostNet(connect(redis_url), host, underlay or source_address(redis_url),
                       settings.home / "hosts" / host / "net")
    vmnet.configure(host_net)
    return host_net


def source_address(redis_url: str) -> str:
    """The local address the kernel would send from to Redis's host (a UDP socket sends nothing)."""
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((parts.hostname or "127.0.0.1", parts.port or 6379))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def consume(app: Celery, host: str, *, concurrency: int, loglevel: str) -> None:
    """Run Celery's consumer until a shutdown is asked for (SIGTERM, SIGINT).

    kombu's Redis transport can die of its own reconnection after Redis drops the
    connection ("Unrecoverable error"). The host must not be lost over it: the consumer is
    started again in this process, which keeps the libvirt connection (a test:/// hypervisor
    lives in it), the heartbeat and the locks.
    """
    from celery.worker import state

    if logs.structured():
        _celery_notices_as_log_lines()
    while True:
        celery_worker = app.Worker(
            queues=[keys.queue(host)], pool="threads", concurrency=concurrency,
            hostname=f"{host}@{socket.gethostname()}", loglevel=loglevel,
            # event heartbeats (every 2 s) let Flower show the worker online; gossip and mingle stay off
            without_gossip=True, without_mingle=True, without_heartbeat=False, quiet=logs.structured(),
        )
        celery_worker.start()
        if state.should_stop is not None or state.should_terminate is not None or not celery_worker.exitcode:
            return
        log.error("the Celery consumer stopped (exit code %s) without a shutdown request; restarting it",
                  celery_worker.exitcode)
        time.sleep(1)


def _celery_notices_as_log_lines() -> None:
    """Celery writes its shutdown notices straight to stdout; with JSON logs every line must be JSON."""
    import celery.apps.worker

    def say(msg: str, _file: object = None) -> None:
        log.warning("%s", msg)

    celery.apps.worker.safe_say = say


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kick_mailboxes(app: Celery, store: Store, host: str) -> int:
    """Send one wake-up per VM of this host with unfinished jobs.

    A submitter that died between accepting a job and sending its message, or a message
    lost with a broker, would otherwise leave the job queued until the VM's next job.
    Duplicate wake-ups are harmless (see ``worker.runner``).
    """
    kicked = 0
    for namespace, vm in store.vms_on_host(host):
        pending = store.mailbox(namespace, vm)
        if pending:
            enqueue(app, host, namespace, vm, pending[-1][0])
            kicked += 1
    if kicked:
        log.info("woke %d VM mailboxes with unfinished jobs", kicked)
    return kicked
