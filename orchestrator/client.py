"""The client the CLI (and later the HTTP API) calls: the one seam between users and the cluster.

``Client`` is the interface; ``RedisClient`` talks to the job store and the queue directly.
"""

from __future__ import annotations

import copy
import getpass
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from . import keys, placement
from .errors import AlreadyExists, ClusterUnavailable, ExecError, InvalidInput, NotFound
from .locks import LockManager, cmd_lock, host_lock, vms_lock
from .names import check_namespace
from .operation import LaunchParams, MoveOutParams, Op, Operation
from .records import Event, Host, HostState, Job, JobState, Namespace, Vm
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
             op: Op | None = None, limit: int = 50, before: int | None = None) -> list[Job]: ...
    def wait(self, ids: Sequence[int], *, timeout: float | None = None,
             on_update: OnUpdate | None = None) -> list[Job]: ...
    def cancel(self, job_id: int) -> Job: ...
    def vm(self, namespace: str, name: str) -> Vm: ...
    def vms(self, namespace: str) -> list[Vm]: ...
    def hosts(self) -> list[Host]: ...
    def drain(self, host: str, draining: bool) -> Host: ...
    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]: ...
    def plan(self, ops: Sequence[Operation]) -> dict[str, str]: ...
    def namespaces(self) -> list[Namespace]: ...
    def create_namespace(self, name: str, hosts: list[str] | None) -> Namespace: ...
    def delete_namespace(self, name: str, *, force: bool) -> list[Job]: ...
    def finish_namespace_delete(self, name: str) -> int: ...


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
        #: who the history says asked (the API sets an API token's name per request)
        self.actor = who()

    def acting_as(self, actor: str) -> RedisClient:
        """This client (same connections) recording ``actor`` as the one who asks."""
        view = copy.copy(self)
        view.actor = actor
        return view

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
        if any(o.op is Op.MOVE_IN for o in ops):
            raise InvalidInput("move-in jobs are made by 'vm move'", hint="use 'vmorch vm move NAME --to HOST'")
        launches = [o for o in ops if o.op is Op.LAUNCH]
        others = [o for o in ops if o.op is not Op.LAUNCH]
        _check_launches(launches)
        # Refuse the whole batch before accepting any of it (one round trip for all the names).
        pipe = self.redis.pipeline(transaction=False)
        for op in others:
            pipe.sismember(keys.vms(op.namespace), op.vm)
        seen: set[tuple[str, str]] = set()
        for op, exists in zip(others, pipe.execute(), strict=True):
            if not exists:
                raise NotFound(f"no VM {op.vm!r} in namespace {op.namespace!r}",
                               hint="list VMs with 'vmorch vm list' (and check --namespace)")
            if op.op is Op.MOVE_OUT:
                # an earlier job of this batch on the same VM (a kill, say) is as good as a pending one
                self._check_move(op, behind_others=(op.namespace, op.vm) in seen)
            seen.add((op.namespace, op.vm))
        accepted: list[tuple[Submitted, Operation]] = []
        try:
            if launches:
                accepted += self._submit_launches(launches)
            for op in others:  # in the order given: it is the VMs' order
                accepted += self._submit_move(op) if op.op is Op.MOVE_OUT else [(self.store.submit(op, self.actor), op)]
        finally:
            # A refusal that only shows under the locks (a move's target filled up meanwhile) comes after
            # some jobs were accepted: those still get their message, never stay queued for nothing.
            self._enqueue(accepted)
        return self.store.get_jobs(s.id for s, _ in accepted)

    def _submit_launches(self, ops: list[Operation]) -> list[tuple[Submitted, Operation]]:
        by_ns: dict[str, list[Operation]] = defaultdict(list)
        for op in ops:
            by_ns[op.namespace].append(op)
        out: list[tuple[Submitted, Operation]] = []
        for ns, batch in sorted(by_ns.items()):
            # cmd: the name reservation and placement decision; vms: the registry write; host:*: the
            # reservations on every candidate, so placements in other namespaces can't race for the same room.
            candidates = self._candidate_hosts(ns, batch)
            host_locks = [host_lock(name) for name in candidates]
            with self.locks.hold(cmd_lock(ns), vms_lock(ns), *host_locks, timeout=self.settings.submit_lock_timeout):
                chosen = self._plan(ns, batch, locked=set(candidates))
                out += [(self.store.submit_launch(op, chosen[op.vm], self.actor), op) for op in batch]  # LOCK: all
        return out

    def _candidate_hosts(self, ns: str, batch: list[Operation]) -> list[str]:
        """The hosts a batch could land on, to lock (before locking: placement re-checks under the locks).

        Locking only these keeps a launch's cost independent of hosts it can't use; a host that
        comes up meanwhile is simply not considered by this launch.
        """
        info = self.store.namespace(ns)
        allowed = set(info.hosts) if info is not None and info.hosts else None
        pinned: set[str] = set()
        labels: list[dict[str, str]] = []
        for op in batch:
            p = op.params
            assert isinstance(p, LaunchParams)
            if p.host:
                pinned.add(p.host)
            elif p.colocate:
                pinned.add(self.store.get_vm(ns, p.colocate).host)
            else:
                labels.append(p.host_labels)
        names = []
        for h in self.store.hosts():
            usable = h.state is HostState.UP and (allowed is None or h.name in allowed)
            wanted = h.name in pinned or any(all(h.labels.get(k) == v for k, v in want.items()) for want in labels)
            if usable and wanted:
                names.append(h.name)
        # A pinned host that isn't usable still goes to the planner, which says why it can't be used.
        return sorted(set(names) | pinned)

    def _plan(self, ns: str, batch: list[Operation], locked: set[str] | None = None) -> dict[str, str]:
        """# LOCK: for a real launch the caller holds cmd:<ns>, vms:<ns> and the candidate hosts' locks."""
        info = self.store.namespace(ns)
        if info is not None and info.state == "deleting":
            raise InvalidInput(f"namespace {ns!r} is being deleted", hint="use another namespace, or wait")
        taken = [op.vm for op in batch if self.redis.sismember(keys.vms(ns), op.vm)]
        if taken:
            raise AlreadyExists(f"VM {taken[0]!r} already exists in namespace {ns!r}"
                                + (f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""),
                                hint="pick other names, or delete them first with 'vmorch vm delete'")
        hosts = self.store.hosts()  # all of them, so a refusal can say exactly what is missing
        requests, spread = [], False
        for op in batch:
            p = op.params
            assert isinstance(p, LaunchParams)
            colocate_host = self.store.get_vm(ns, p.colocate).host if p.colocate else None
            requests.append(placement.Request(op.vm, p.memory_mib, p.vcpus, p.host, p.host_labels, colocate_host))
            spread = spread or p.spread
        limits = placement.Limits(self.settings.memory_allocation_ratio, self.settings.cpu_allocation_ratio)
        allowed = set(info.hosts) if info is not None and info.hosts else None
        chosen = placement.plan(requests, hosts, allowed=allowed, spread=spread, limits=limits)
        unlocked = sorted(set(chosen.values()) - locked) if locked is not None else []
        if unlocked:  # only when a host came up between choosing what to lock and deciding
            raise ClusterUnavailable(f"host {unlocked[0]!r} joined during placement", hint="submit again")
        return chosen

    def _check_move(self, op: Operation, *, behind_others: bool = True) -> Vm:
        """Refuse a move that can't happen, before anything of its batch is accepted.

        Whether the VM is shut off is only judged when no other job of it comes first.
        """
        p = op.params
        assert isinstance(p, MoveOutParams)
        ns = op.namespace
        vm = self.store.get_vm(ns, op.vm)
        hosts = {h.name: h for h in self.store.hosts()}
        if p.to not in hosts:
            raise InvalidInput(f"unknown host {p.to!r}", hint=f"known hosts: {', '.join(sorted(hosts))}")
        if p.to == vm.host:
            raise InvalidInput(f"VM {op.vm!r} is already on host {p.to!r}", hint="pick another host")
        if p.live:
            _check_live(hosts[vm.host], hosts[p.to], vm)
        elif vm.state.value in ("running", "paused") and not behind_others and not self.store.mailbox(ns, op.vm):
            raise InvalidInput(f"VM {op.vm!r} is {vm.state.value}; only a shut-off VM moves without --live",
                               hint="stop it first ('vmorch vm stop NAME --force'), or move it --live")
        return vm

    def _submit_move(self, op: Operation) -> list[tuple[Submitted, Operation]]:
        p = op.params
        assert isinstance(p, MoveOutParams)
        ns = op.namespace
        vm = self._check_move(op)
        # cmd: a placement decision; both hosts: the reservation on the target, the hand-over between them.
        with self.locks.hold(cmd_lock(ns), host_lock(vm.host), host_lock(p.to),
                             timeout=self.settings.submit_lock_timeout):
            vm = self.store.get_vm(ns, op.vm, as_stored=True)
            info = self.store.namespace(ns)
            allowed = set(info.hosts) if info is not None and info.hosts else None
            limits = placement.Limits(self.settings.memory_allocation_ratio, self.settings.cpu_allocation_ratio)
            placement.plan([placement.Request(vm.name, vm.memory_mib, vm.vcpus, host=p.to)],
                           [h for h in self.store.hosts() if h.name == p.to], allowed=allowed, limits=limits)
            out, into = self.store.submit_move(op, p.to, vm.host, self.actor)  # LOCK: cmd, host:source, host:target
        return [(out, op), (into, op)]

    def plan(self, ops: Sequence[Operation]) -> dict[str, str]:
        """Where launches would go, changing nothing (``vm launch --dry-run``)."""
        out: dict[str, str] = {}
        by_ns: dict[str, list[Operation]] = defaultdict(list)
        for op in ops:
            by_ns[op.namespace].append(op)
        for ns, batch in sorted(by_ns.items()):
            out.update(self._plan(ns, batch))
        return out

    # -- namespaces ---------------------------------------------------------------------

    def namespaces(self) -> list[Namespace]:
        return self.store.namespaces()

    def create_namespace(self, name: str, hosts: list[str] | None) -> Namespace:
        check_namespace(name)
        known = {h.name for h in self.store.hosts()}
        unknown = sorted(set(hosts or []) - known)
        if unknown:
            raise InvalidInput(f"unknown host {unknown[0]!r}", hint=f"known hosts: {', '.join(sorted(known))}")
        with self.locks.hold(cmd_lock(name), timeout=self.settings.submit_lock_timeout):
            if self.store.namespace(name) is not None:
                raise AlreadyExists(f"namespace {name!r} already exists", hint="see 'vmorch ns list'")
            return self.store.create_namespace(name, hosts)  # LOCK: cmd

    def delete_namespace(self, name: str, *, force: bool) -> list[Job]:
        """Start deleting a namespace: its VMs go through ordinary delete jobs.

        The cmd lock is held only for the decision; the caller waits for the jobs without
        any lock, then calls ``finish_namespace_delete``.
        """
        with self.locks.hold(cmd_lock(name), timeout=self.settings.submit_lock_timeout):
            info = self.store.namespace(name)
            if info is None:
                raise NotFound(f"no namespace {name!r}", hint="see 'vmorch ns list'")
            names = self.store.vm_names(name)
            if names and not force:
                raise InvalidInput(f"namespace {name!r} has {len(names)} VMs",
                                   hint="delete them first, or pass --force to delete them with it")
            self.store.mark_namespace_deleting(name)  # LOCK: cmd -- no launch gets in from now on
            accepted = [(self.store.submit(op, self.actor), op)
                        for op in (Operation.build(Op.DELETE, name, vm) for vm in names)]
        self._enqueue(accepted)
        return self.store.get_jobs(s.id for s, _ in accepted)

    def finish_namespace_delete(self, name: str) -> int:
        with self.locks.hold(cmd_lock(name), timeout=self.settings.submit_lock_timeout):
            left = self.store.vm_names(name)
            if left:
                raise ExecError(f"namespace {name!r} still has VMs: {', '.join(left[:5])}",
                                hint="see their delete jobs with 'vmorch job list --state failed', then retry")
            return self.store.purge_namespace(name)  # LOCK: cmd

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
             op: Op | None = None, limit: int = 50, before: int | None = None) -> list[Job]:
        return self.store.list_jobs(namespace, vm=vm, state=state, op=op, limit=limit, before=before)

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
        self.store.cancel(job_id, self.actor)
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


def _check_launches(launches: list[Operation]) -> None:
    """Refuse, before anything is accepted, launch batches that could only be accepted in part.

    (The CLI never makes them; a request to the API can.)
    """
    if len({o.namespace for o in launches}) > 1:
        raise InvalidInput("launches of one request must all be in one namespace",
                           hint="send one request per namespace")
    names = Counter(o.vm for o in launches)
    twice = sorted(name for name, n in names.items() if n > 1)
    if twice:
        raise InvalidInput(f"VM {twice[0]!r} is launched more than once in one request", hint="launch each name once")


def _check_live(source: Host, target: Host, vm: Vm) -> None:
    """Refuse a live move that can't happen, naming what is missing."""
    for host in (source, target):
        scheme = host.libvirt_uri.split(":", 1)[0]
        if scheme == "test" or "/embed" in host.libvirt_uri:
            raise InvalidInput(
                f"live migration is not possible here: host {host.name} runs {host.libvirt_uri}; it needs a "
                f"libvirtd on both hosts", hint="stop the VM ('vmorch vm stop NAME --force') and move it shut off")
    if not target.migrate_uri:
        raise InvalidInput(f"live migration to {target.name} is not possible: its worker gives no --migrate-uri",
                           hint="start its worker with --migrate-uri qemu+tcp://HOST/system")
    if vm.state.value != "running":
        raise InvalidInput(f"VM {vm.name!r} is {vm.state.value}; only a running VM moves live",
                           hint="move it without --live")


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

