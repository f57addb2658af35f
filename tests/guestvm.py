"""Helpers for tests that boot the test guest under real QEMU workers (``test_guest``, ``test_console``,
``test_accel``): an embedded-QEMU host, a namespace of the module's own, and waits on the guest."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import JobState, Vm
from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import console

from .conftest import WorkerProc, cleanup_namespace, start_worker, wait_hosts_up
from .guest import BOOT_MARKER
from .test_qemu import qemu_pids

__all__ = ["BOOT_MARKER", "GuestCluster", "guest_cluster", "qemu_pids"]


@dataclass
class GuestCluster:
    settings: Settings
    client: RedisClient
    redis: Redis
    workers: list[WorkerProc]
    roots: list[Path]
    images: list[str] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def import_image(self, name: str, path: Path) -> None:
        """``path`` into the catalog as ``name``, on every host of this cluster (removed at the end)."""
        jobs = self.client.import_image(name, f"file://{path}", hosts=[w.host for w in self.workers])
        done = self.client.wait([j.id for j in jobs], timeout=120)
        assert all(j.state is JobState.SUCCEEDED for j in done), [j.error for j in done]
        self.images.append(name)

    def launch(self, name: str, *, host: str, image: str | None, memory_mib: int = 256, vcpus: int = 1,
               disk_gib: int = 1) -> Vm:
        params: dict[str, object] = {"memory_mib": memory_mib, "vcpus": vcpus, "disk_gib": disk_gib, "host": host}
        if image is not None:
            params["image"] = image
        [job] = self.client.wait([j.id for j in self.client.submit(
            [Operation.build(Op.LAUNCH, self.namespace, name, **params)])], timeout=120)
        assert job.state is JobState.SUCCEEDED, job.error
        return self.client.vm(self.namespace, name)

    def console_text(self, name: str) -> str:
        return console.read(self.redis, self.namespace, name).text

    def wait_console(self, name: str, text: str, timeout: float = 120.0, count: int = 1) -> float:
        """Wait until ``text`` shows ``count`` times in the VM's console stream; the seconds it took."""
        start = time.monotonic()
        while self.console_text(name).count(text) < count:
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{text!r} not on {name}'s console within {timeout:g}s; it shows:\n"
                                     f"{self.console_text(name)[-2000:]}")
            time.sleep(0.2)
        return time.monotonic() - start

    def wait_agent(self, name: str, timeout: float = 120.0) -> float:
        start = time.monotonic()
        while self.client.vm(self.namespace, name).agent != "connected":
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{name}'s agent not connected within {timeout:g}s:\n"
                                     f"{self.console_text(name)[-2000:]}")
            time.sleep(0.2)
        return time.monotonic() - start


def root_of(worker: WorkerProc) -> Path:
    return Path(worker.libvirt_uri.split("root=", 1)[1])


def domain_xml_file(worker: WorkerProc, domain: str) -> str:
    """A domain's persistent definition as the embedded driver keeps it under its root."""
    return (root_of(worker) / "etc" / "qemu" / f"{domain}.xml").read_text()


@contextmanager
def guest_cluster(base_settings: Settings, tmp: Path, namespace: str, hosts: dict[str, dict[str, str]],
                  ) -> Iterator[GuestCluster]:
    """QEMU hosts (name -> extra environment), a namespace of their own; at the end the namespace is
    cleaned, the workers stopped by PID and every QEMU they started is asserted gone."""
    settings = base_settings.model_copy(update={"namespace": namespace})
    workers: list[WorkerProc] = []
    roots: list[Path] = []
    client = RedisClient(settings)
    redis = Redis.from_url(settings.resolved_redis_url(), decode_responses=True)
    try:
        for host, env in hosts.items():
            root = tmp / f"root-{host}"
            root.mkdir(parents=True, exist_ok=True)
            roots.append(root)
            workers.append(start_worker(base_settings, host, f"qemu:///embed?root={root}", concurrency=2, env=env))
        wait_hosts_up(base_settings, *workers, timeout=90)
        cluster = GuestCluster(settings, client, redis, workers, roots)
        yield cluster
        cleanup_namespace(client, redis, namespace)
        for image in cluster.images:
            removed = client.wait([j.id for j in client.remove_image(image)], timeout=60)
            assert all(j.state is JobState.SUCCEEDED for j in removed), [j.error for j in removed]
    finally:
        for worker in workers:
            worker.stop()
        leftover = [pid for root in roots for pid in qemu_pids(root)]
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        redis.close()
        assert not leftover, f"QEMU processes outlived the test: {leftover}"
