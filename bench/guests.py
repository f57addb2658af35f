"""What B7–B9 share: embedded-QEMU hosts with the test guest in their catalog, guests launched to
agent-ready through vmorch, the direct-libvirt side (``bench.direct_guests``) driven from here, and
a clean-up that leaves no QEMU behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from orchestrator.localcluster.guestimage import build
from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import Job
from orchestrator.services.client import RedisClient

from .b6_qemu import qemu_pids
from .common import require_succeeded
from .harness import ROOT, Env

NS = "guests"
IMAGE = "bench-guest"
#: the guest's whole system is its initramfs, in RAM: 128 MiB leaves it room
MEMORY_MIB = 128


@dataclass
class Guests:
    """vmorch's side: its client, its hosts, and the accelerator their workers' probes found."""

    client: RedisClient
    hosts: list[str]
    accel: str
    accel_reason: str

    @property
    def virt_type(self) -> str:
        return "kvm" if self.accel == "kvm" else "qemu"

    def submit_launches(self, names: Sequence[str], memory_mib: int = MEMORY_MIB) -> list[Job]:
        return self.client.submit([Operation.build(Op.LAUNCH, NS, n, memory_mib=memory_mib, disk_gib=1, image=IMAGE,
                                                   host=self.hosts[i % len(self.hosts)]) for i, n in enumerate(names)])

    def exec_true(self, names: Sequence[str], timeout: float) -> list[Job]:
        """``vm exec NAME -- true`` for each; its jobs, succeeded (with exit code 0) or an error."""
        jobs = self.client.submit([Operation.build(Op.EXEC, NS, n, command=["true"], timeout_s=timeout)
                                   for n in names])
        return self.client.wait([j.id for j in jobs], timeout=timeout + 60)

    def to_agent(self, names: Sequence[str], timeout: float, memory_mib: int = MEMORY_MIB, *,
                 then: Callable[[], object] | None = None) -> float:
        """Seconds from submitting the launches to every guest's first ``exec true`` done (the agent answered).

        The execs are submitted right after the launches, as a script would: each runs after its VM's
        launch (the VM's order) and waits for the agent within ``timeout``. ``then`` is called right
        after the launches are submitted (B7 starts its other side there)."""
        t = time.perf_counter()
        launched = self.submit_launches(names, memory_mib)
        if then is not None:
            then()
        execed = self.exec_true(names, timeout)
        took = time.perf_counter() - t
        require_succeeded(self.client.wait([j.id for j in launched], timeout=60))
        check_exit_zero(execed)
        return took

    def delete(self, names: Sequence[str]) -> None:
        if not names:
            return
        jobs = self.client.submit([Operation.build(Op.DELETE, NS, n) for n in names])
        require_succeeded(self.client.wait([j.id for j in jobs], timeout=300))


def check_exit_zero(jobs: Sequence[Job]) -> None:
    require_succeeded(jobs)
    bad = [j for j in jobs if (j.result or {}).get("exit_code") != 0]
    if bad:
        raise RuntimeError(f"exec true in {bad[0].vm} gave {bad[0].result}")


def uri(env: Env, root: str) -> str:
    return f"qemu:///embed?root={env.home / root}"


def start_hosts(env: Env, hosts: Sequence[str]) -> Guests:
    """Embedded-QEMU workers ``hosts``, up, with the test guest (built or cached) imported on each."""
    for h in hosts:
        env.worker(h, uri(env, h))
    env.wait_hosts(*hosts, timeout=120)  # the accel probe boots a guest first
    client = RedisClient(env.settings)
    found = {h.name: h for h in client.hosts() if h.name in hosts}
    accels = {h.accel for h in found.values()}
    if len(accels) != 1:
        raise RuntimeError(f"the hosts' probes disagree: { {h: r.accel for h, r in found.items()} }")
    jobs = client.import_image(IMAGE, f"file://{build()}", hosts=list(hosts))
    require_succeeded(client.wait([j.id for j in jobs], timeout=120))
    return Guests(client, list(hosts), accels.pop(), found[hosts[0]].accel_reason)


class Direct:
    """One ``bench.direct_guests`` process: a direct libvirt connection with its own embedded root."""

    def __init__(self, env: Env, label: str, virt_type: str) -> None:
        with (env.home / f"{label}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.direct_guests", str(env.home / label), str(env.home / f"{label}-store"),
                 str(build()), virt_type], cwd=ROOT, env=env.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log)
        env.procs.append(self.proc)  # stopped by PID with the rest, if this one is not closed first
        self.log = env.home / f"{label}.log"
        self.receive()

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def send(self, **request: Any) -> None:
        stdin, _ = self._pipes()
        stdin.write(json.dumps(request).encode() + b"\n")
        stdin.flush()

    def receive(self) -> dict[str, Any]:
        _, stdout = self._pipes()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the direct libvirt process ended; see {self.log}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"direct libvirt: {reply['error']}")
        return reply

    def exec_true(self, name: str) -> float:
        self.send(op="exec", name=name, argv=["true"])
        reply = self.receive()
        if reply["exit_code"] != 0:
            raise RuntimeError(f"direct exec true in {name} gave {reply}")
        return float(reply["took"])

    def delete(self, names: Sequence[str]) -> None:
        self.send(op="delete", names=list(names))
        self.receive()

    def close(self) -> None:
        stdin, stdout = self._pipes()
        with contextlib.suppress(OSError):
            stdin.close()  # end of input: it deletes what it made and exits
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)  # the harness waits for it, and kills it after 20 s
        stdout.close()


@contextmanager
def no_leftovers(env: Env, guests: list[Guests], directs: list[Direct]) -> Iterator[None]:
    """At the end (``guests``, ``directs``: filled in as they start): vmorch's VMs deleted and its image
    removed, the direct processes closed, and any QEMU still under the run's home killed by PID."""
    try:
        yield
    finally:
        for g in guests:
            with contextlib.suppress(Exception):  # a failed run still kills its QEMUs below
                g.delete(g.client.store.vm_names(NS))
                g.client.wait([j.id for j in g.client.remove_image(IMAGE)], timeout=60)
        for d in directs:
            d.close()
        for pid in qemu_pids(env.home):
            os.kill(pid, signal.SIGKILL)
