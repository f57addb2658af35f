"""Reading the cluster (jobs, VMs, hosts, history), waiting for jobs, and canceling them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from orchestrator.control import deps
from orchestrator.control.connection import Connection
from orchestrator.model.errors import NotFound
from orchestrator.model.operation import Op
from orchestrator.model.records import Event, Host, Job, JobState, Vm
from orchestrator.store import keys, retention
from orchestrator.store.history import History
from orchestrator.store.networks import NetworkRecords
from orchestrator.store.retention import PruneReport

OnUpdate = Callable[[list[Job]], None]


class Reading(Connection):
    # -- reading ------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        return self.store.get_job(job_id)

    def jobs(self, namespace: str, *, vm: str | None = None, state: JobState | None = None,
             op: Op | None = None, limit: int = 50, before: int | None = None) -> list[Job]:
        return self.store.list_jobs(namespace, vm=vm, state=state, op=op, limit=limit, before=before)

    def vm(self, namespace: str, name: str) -> Vm:
        """The VM; each NIC on a network with the address its guest agent reports for its MAC, or
        else the one the network's DHCP server leased it."""
        vm = self.store.get_vm(namespace, name)
        if not vm.nics:
            return vm
        seen = {a.mac.lower(): a.ip for a in vm.addresses if ":" not in a.ip}
        records = NetworkRecords(self.redis)
        leases: dict[str, str] = {}
        for net in {n.net for n in vm.nics}:
            found = records.get(namespace, net)
            leases.update(found.leases if found is not None else {})
        nics = [n.model_copy(update={"ip": seen.get(n.mac) or leases.get(n.mac)}) for n in vm.nics]
        return vm.model_copy(update={"nics": nics})

    def vms(self, namespace: str) -> list[Vm]:
        return self.store.list_vms(namespace)

    def hosts(self) -> list[Host]:
        return self.store.hosts()

    def drain(self, host: str, draining: bool) -> Host:
        return self.store.set_draining(host, draining)

    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]:
        return self.store.events(namespace, vm=vm, job_id=job_id, limit=limit)

    def history(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
                limit: int = 100) -> History:
        """``events``, and how many older entries were trimmed (``History.trimmed``)."""
        return self.store.history(namespace, vm=vm, job_id=job_id, limit=limit)

    def prune(self, namespace: str | None, *, older_than: float | None = None) -> PruneReport:
        """Remove the finished jobs older than ``older_than`` s (default: the retention) now (``retention``)."""
        return retention.prune(self.store, self.settings, namespace=namespace, older_than=older_than)

    def cancel(self, job_id: int) -> Job:
        """Cancel a job; for a parent, its children not yet started (running ones carry on)."""
        job = self.store.get_job(job_id)
        targets = [c.id for c in self.store.children(job_id) if c.state in (JobState.QUEUED, JobState.WAITING)] \
            if job.is_parent else [job_id]
        for target in targets:
            _, released = self.store.cancel(target, self.actor)
            deps.wake(self.celery, self.store, released)
        return self.store.get_job(job_id)

    def wait(self, ids: Sequence[int], *, timeout: float | None = None, on_update: OnUpdate | None = None) -> list[Job]:
        """Block until every job is final; wakes on the store's update channel, re-reads as a fallback.

        Without ``on_update`` only a job announced final is read again: nobody looks at the steps between.
        """
        pubsub = self._subscribe()
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
                changed = {i for i, state in _drain_updates(pubsub, self.settings.wait_poll_interval).items()
                           if on_update is not None or state in _FINAL}
                if time.monotonic() - last_full >= self.settings.wait_poll_interval:
                    changed, last_full = set(pending), time.monotonic()
                for job in self.store.get_jobs(i for i in changed if i in jobs):
                    jobs[job.id] = job
        finally:
            self._unsubscribe(pubsub)

    def _subscribe(self) -> Any:
        """This thread's subscriber to the update channel, subscribed.

        It is kept between waits (unsubscribed), so a wait doesn't open a connection of its own.
        """
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self._local.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(keys.UPDATES)
        _drain_updates(pubsub, 0)  # left from the last wait: the jobs are read after this anyway
        return pubsub

    def _unsubscribe(self, pubsub: Any) -> None:
        try:
            pubsub.unsubscribe()
        except RedisError:  # a broken subscriber is dropped; the next wait makes a new one
            self._local.pubsub = None
            pubsub.close()



_FINAL = frozenset(s.value for s in JobState if s.final)


def _drain_updates(pubsub: Any, wait: float) -> dict[int, str]:
    """Job ids announced on the update channel within ``wait`` seconds (all that queued up), with their state."""
    changed: dict[int, str] = {}
    message = pubsub.get_message(timeout=wait)
    while message is not None:
        job_id, _, state = str(message["data"]).partition(" ")
        if job_id.isdigit():
            changed[int(job_id)] = state
        message = pubsub.get_message(timeout=0)
    return changed
