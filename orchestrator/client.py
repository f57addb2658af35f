"""The client the CLI (and later the HTTP API) calls: the one seam between users and the cluster.

``Client`` is the interface; ``RedisClient`` talks to the job store and the queue directly.
"""

from __future__ import annotations

import getpass
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from . import keys
from .errors import AlreadyExists, ClusterUnavailable, InvalidInput, NoCapacity, NotFound
from .locks import LockManager, cmd_lock, vms_lock
from .operation import LaunchParams, Op, Operation
from .records import Event, Host, HostState, Job, JobState, Vm
from .redisconn import connect, ping
from .settings import Settings
from .store import Store, Submitted

if TYPE_CHECKING:
    from celery import Celery

OnUpdate = Callable[[list[Job]], None]


class Client(Protocol):
    def submit(self, ops: Sequence[Operation]) -> list[Job]: ...
    def job(self, job_id: int) -> Job: ...
    def jobs(self, namespace: str, *, vm: str | None = None, state: JobState | None = None,
             op: Op | None = None, limit: int = 50) -> list[Job]: ...
    def wait(self, ids: Sequence[int], *, timeout: float | None = None,
             on_update: OnUpdate | None = None) -> list[Job]: ...
    def cancel(self, job_id: int) -> Job: ...
    def vm(self, namespace: str, name: str) -> Vm: ...
    def vms(self, namespace: str) -> list[Vm]: ...
    def hosts(self) -> list[Host]: ...
    def drain(self, host: str, draining: bool) -> Host: ...
    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]: ...


def who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class RedisClient:
    """Talks to Redis and Celery directly. For the CLI on a machine that can reach Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.resolved_redis_url()
        self.redis = connect(self.url, retries=2)
        ping(self.redis, self.url)
        self.store = Store(self.redis, host_down_after=settings.host_down_after)
        self._locks: LockManager | None = None
        self._celery: Celery | None = None

    @property
    def locks(self) -> LockManager:
        if self._locks is None:
            self._locks = LockManager(self.url, owner=f"client@{socket.gethostname()}",
                                      expire=self.settings.lock_expire)
        return self._locks

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            from .queue import make_app

            self._celery = make_app(self.settings)
        return self._celery

    # -- submitting ---------------------------------------------------------------------

    def submit(self, ops: Sequence[Operation]) -> list[Job]:
        """Accept operations: all of them or, on bad input, none."""
        launches = [o for o in ops if o.op is Op.LAUNCH]
        others = [o for o in ops if o.op is not Op.LAUNCH]
        # Refuse the whole batch before accepting any of it.
        for op in others:
            if not self.redis.sismember(keys.vms(op.namespace), op.vm):
                raise NotFound(f"no VM {op.vm!r} in namespace {op.namespace!r}",
                               hint="list VMs with 'vmorch vm list' (and check --namespace)")
        accepted = self._submit_launches(launches) if launches else []
        accepted += [(self.store.submit(op, who()), op) for op in others]
        self._enqueue(accepted)
        return self.store.get_jobs(s.id for s, _ in accepted)

    def _submit_launches(self, ops: list[Operation]) -> list[tuple[Submitted, Operation]]:
        by_ns: dict[str, list[Operation]] = defaultdict(list)
        for op in ops:
            by_ns[op.namespace].append(op)
        out: list[tuple[Submitted, Operation]] = []
        for ns, batch in sorted(by_ns.items()):
            # cmd: the name reservation and placement decision; vms: the registry write.
            with self.locks.hold(cmd_lock(ns), vms_lock(ns), timeout=self.settings.submit_lock_timeout):
                taken = [op.vm for op in batch if self.redis.sismember(keys.vms(ns), op.vm)]
                if taken:
                    raise AlreadyExists(f"VM {taken[0]!r} already exists in namespace {ns!r}"
                                        + (f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""),
                                        hint="pick other names, or delete them first with 'vmorch vm delete'")
                placement = self._place(batch)  # LOCK: cmd:<ns>
                out += [(self.store.submit_launch(op, placement[op.vm], who()), op) for op in batch]  # LOCK: cmd, vms
        return out

    def _place(self, ops: list[Operation]) -> dict[str, str]:
        """Choose a host per launch: the pinned one, else the up host with the least committed memory that fits.

        # LOCK: the caller holds cmd:<ns>, so two placements in a namespace never race.
        """
        hosts = {h.name: h for h in self.store.hosts()}
        committed = {name: h.committed_mib for name, h in hosts.items()}
        placement: dict[str, str] = {}
        for op in ops:
            params = op.params
            assert isinstance(params, LaunchParams)
            if params.host is not None:
                host = hosts.get(params.host)
                if host is None:
                    known = ", ".join(sorted(hosts)) or "none registered"
                    raise InvalidInput(f"unknown host {params.host!r}", hint=f"known hosts: {known}")
                if host.state is not HostState.UP:
                    raise InvalidInput(f"host {params.host!r} is {host.state.value}",
                                       hint="pick a host that is up (see 'vmorch host list')")
                chosen = host.name
            else:
                candidates = [h for h in hosts.values() if h.state is HostState.UP]
                if not candidates:
                    raise ClusterUnavailable("no host is up to place the VM on",
                                             hint="start a worker ('vmorch up', or 'vmorch worker --host NAME')")
                fitting = [h for h in candidates if committed[h.name] + params.memory_mib <= h.memory_mib]
                if not fitting:
                    free = max(h.memory_mib - committed[h.name] for h in candidates)
                    raise NoCapacity(f"no host has {params.memory_mib} MiB of memory free for {op.vm!r} "
                                     f"(the most free on one host is {free} MiB)",
                                     hint="ask for less memory, delete VMs, or add a host")
                chosen = min(fitting, key=lambda h: (committed[h.name], h.name)).name
            committed[chosen] += params.memory_mib
            placement[op.vm] = chosen
        return placement

    def _enqueue(self, accepted: list[tuple[Submitted, Operation]]) -> None:
        from .queue import enqueue

        for s, op in accepted:
            try:
                enqueue(self.celery, s.host, op.namespace, op.vm, s.id)
            except Exception as exc:  # the broker refused: the job must not stay queued forever
                self.store.fail_unsent(s, f"could not enqueue: {exc}")

    # -- reading ------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        return self.store.get_job(job_id)

    def jobs(self, namespace: str, *, vm: str | None = None, state: JobState | None = None,
             op: Op | None = None, limit: int = 50) -> list[Job]:
        return self.store.list_jobs(namespace, vm=vm, state=state, op=op, limit=limit)

    def vm(self, namespace: str, name: str) -> Vm:
        return self.store.get_vm(namespace, name)

    def vms(self, namespace: str) -> list[Vm]:
        return self.store.list_vms(namespace)

    def hosts(self) -> list[Host]:
        return self.store.hosts()

    def drain(self, host: str, draining: bool) -> Host:
        return self.store.set_draining(host, draining)

    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]:
        return self.store.events(namespace, vm=vm, job_id=job_id, limit=limit)

    def cancel(self, job_id: int) -> Job:
        self.store.cancel(job_id, who())
        return self.store.get_job(job_id)

    def wait(self, ids: Sequence[int], *, timeout: float | None = None, on_update: OnUpdate | None = None) -> list[Job]:
        """Block until every job is final; wakes on the store's update channel, re-reads as a fallback."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(keys.UPDATES)
        try:
            jobs = {j.id: j for j in self.store.get_jobs(ids)}
            missing = set(ids) - set(jobs)
            if missing:
                raise NotFound(f"no job {min(missing)}", hint="list jobs with 'vmorch job list'")
            deadline = None if timeout is None else time.monotonic() + timeout
            last_full = time.monotonic()
            while True:
                if on_update:
                    on_update(list(jobs.values()))
                pending = [i for i, j in jobs.items() if not j.state.final]
                if not pending:
                    return [jobs[i] for i in ids]
                if deadline is not None and time.monotonic() >= deadline:
                    return [jobs[i] for i in ids]
                changed = _drain_updates(pubsub, self.settings.wait_poll_interval)
                if time.monotonic() - last_full >= self.settings.wait_poll_interval:
                    changed, last_full = set(pending), time.monotonic()
                for job in self.store.get_jobs(i for i in changed if i in jobs):
                    jobs[job.id] = job
        finally:
            pubsub.close()


def _drain_updates(pubsub: object, wait: float) -> set[int]:
    """Job ids announced on the update channel within ``wait`` seconds (all that queued up)."""
    changed: set[int] = set()
    message = pubsub.get_message(timeout=wait)  # type: ignore[attr-defined]
    while message is not None:
        job_id, _, _ = str(message["data"]).partition(" ")
        if job_id.isdigit():
            changed.add(int(job_id))
        message = pubsub.get_message(timeout=0)  # type: ignore[attr-defined]
    return changed

