"""The job store: jobs, the VM registry and hosts, as they live in Redis.

``Store`` is one object over all of it; its parts live beside it: hosts (``hosts``), the VM
registry and namespaces (``vms``), history (``history``), and here the jobs: submitting them,
reading them, and a worker's steps on them. Every change that touches more than one key is one
Lua script (``orchestrator.store.scripts``). Writes made under a lock carry the lock's ``Fence``
and are refused when a newer token was issued since (guarantee 3).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, cast

from orchestrator.model.errors import Canceled, EnqueueFailed, NotFound, VmorchError
from orchestrator.model.network import nics_for
from orchestrator.model.operation import LaunchParams, MoveInParams, Op
from orchestrator.model.records import Job, JobState, Vm, domain_name
from orchestrator.store import keys
from orchestrator.store.entries import (
    AlreadyAccepted,
    BatchEntry,
    Fence,
    Finished,
    Released,
    Submitted,
    Turn,
    as_hash,
    no_vm,
    pairs,
    released_from,
)
from orchestrator.store.history import HistoryStore
from orchestrator.store.scripts import Keys, settle_keys
from orchestrator.store.vms import VmStore, field

__all__ = ["AlreadyAccepted", "BatchEntry", "Fence", "Finished", "Released", "Store", "Submitted", "Turn"]


class Store(VmStore, HistoryStore):
    # -- submitting ---------------------------------------------------------------------

    def submit_batch(self, entries: list[BatchEntry], *, who: str = "", parent: Mapping[str, Any] | None = None,
                     after: Mapping[int, str] | None = None, delay_s: float = 0.0,
                     fail_on_failed_dep: bool = False,
                     idempotency_key: str | None = None) -> tuple[int | None, list[Submitted]]:
        """Accept a batch of jobs, with their parent and their dependencies, in one atomic step.

        ``after`` maps a job id to "ok" (it must succeed) or "final" (any final state will do).
        ``parent``: ``{"namespace", "params"[, "retry_of"]}`` to make one parent job over them all.
        ``delay_s``: once its dependencies are met (or at once), each job waits this long for its turn.
        ``fail_on_failed_dep``: a dependency that already failed fails the jobs at once, as it would have
        had it failed a moment later (else the batch is refused).
        ``idempotency_key``: a key used before raises ``AlreadyAccepted`` with the jobs it made then,
        checked and written in the same atomic step as the jobs (two submits with one key make one batch).
        # LOCK: see lua/submit_batch.lua (launches and moves need their placement locks held).
        """
        ks = Keys(job_next=keys.JOB_NEXT, namespaces=keys.NAMESPACES, **settle_keys())
        jobs: list[dict[str, Any]] = []
        for e in entries:
            o = e.op
            ns, vm = o.namespace, o.vm
            at = {"vm": ks.at(keys.vm(ns, vm)), "seq": ks.at(keys.vm_seq(ns, vm)),
                  "mailbox": ks.at(keys.vm_mailbox(ns, vm)), "jobs": ks.at(keys.jobs(ns)),
                  "events": ks.at(keys.events(ns))}
            entry: dict[str, Any] = {"t": "plain", "ns": ns, "vm": vm, "op": o.op.value,
                                     "params": o.params.model_dump_json(), "k": at}
            if e.retry_of is not None:
                entry["retry_of"] = e.retry_of
            if o.op is Op.LAUNCH:
                p = o.params
                assert isinstance(p, LaunchParams)
                at.update(vms=ks.at(keys.vms(ns)), namespace=ks.at(keys.namespace(ns)), host=ks.at(keys.host(e.host)),
                          host_vms=ks.at(keys.host_vms(e.host)))
                entry.update(t="launch", host=e.host, mib=p.memory_mib, vcpus=p.vcpus, disk=p.disk_gib,
                             image=p.image or "", tags=json.dumps(p.tags), domain=domain_name(ns, vm),
                             nics=json.dumps([n.model_dump(exclude={"ip"}) for n in nics_for(ns, vm, p.nets)]))
            elif o.op is Op.SET:  # checked against the namespace's quota, as a launch is
                at.update(vms=ks.at(keys.vms(ns)), namespace=ks.at(keys.namespace(ns)))
            elif o.op is Op.MOVE_OUT:
                at.update(target=ks.at(keys.host(e.host)))
                entry.update(t="move", source=e.source, target=e.host,
                             in_params=MoveInParams(source=e.source).model_dump_json())
            jobs.append(entry)
        deps = sorted((after or {}).items())
        request: dict[str, Any] = {
            "by": who, "jobs": jobs, "delay": delay_s, "fail_on_failed_dep": fail_on_failed_dep,
            "after": [{"id": dep, "kind": kind, "job": ks.at(keys.job(dep)),
                       "dependents": ks.at(keys.job_dependents(dep))} for dep, kind in deps],
            "after_text": json.dumps([dep for dep, _ in deps]) if deps else ""}
        if parent is not None:
            ks.name(parent_jobs=keys.jobs(parent["namespace"]), parent_events=keys.events(parent["namespace"]))
            request["parent"] = {"ns": parent["namespace"], "params": json.dumps(parent["params"]),
                                 **({"retry_of": parent["retry_of"]} if parent.get("retry_of") else {})}
        if idempotency_key is not None:
            ks.name(idem=keys.idempotency(idempotency_key))
            request["idem_ttl"] = keys.IDEMPOTENCY_TTL
        res = self.scripts.run("submit_batch", ks, request)
        if int(res[0]) < 0:
            raise AlreadyAccepted([int(i) for i in json.loads(res[1])])
        parent_id = int(res[0]) or None
        flat = res[1:]
        return parent_id, [Submitted(int(flat[i]), int(flat[i + 1]), str(flat[i + 2]),
                                     Job.from_hash(pairs(flat[i + 3]))) for i in range(0, len(flat), 4)]

    def accepted_before(self, idempotency_key: str) -> list[int] | None:
        """The jobs a submission with this idempotency key made, if there was one (a fast path: the
        submit script checks again, atomically)."""
        seen = self.redis.get(keys.idempotency(idempotency_key))
        return None if seen is None else [int(i) for i in json.loads(seen)]

    def fail_unsent(self, submitted: Submitted, reason: str) -> list[Released]:
        """A job accepted but whose message could not be sent: make it final, not stranded."""
        job = submitted.job
        ks = Keys(job=keys.job(submitted.id), mailbox=keys.vm_mailbox(job.namespace, job.vm),
                  events=keys.events(job.namespace), **settle_keys())
        error = json.dumps(EnqueueFailed(reason).to_dict())
        return released_from(self.scripts.run("fail_unsent", ks, {"id": submitted.id, "error": error, "detail": reason,
                                                             "by": ""}))

    def release_due(self, by: str = "") -> list[Released]:
        """Give the delayed jobs whose time has come their place in their VMs' order."""
        return released_from(self.scripts.run("release_due", Keys(**settle_keys()), {"by": by}))

    def children(self, parent_id: int) -> list[Job]:
        return self.get_jobs(int(i) for i in cast(list[str], self.redis.zrange(keys.job_children(parent_id), 0, -1)))

    def stale_released(self, older_than: float) -> list[Released]:
        """Released jobs whose wake-up was not confirmed within ``older_than`` seconds (a crash in between)."""
        ids = cast(list[str], self.redis.zrangebyscore(keys.RELEASED, "-inf", self.redis_time() - older_than))
        out = []
        for job in self.get_jobs(int(i) for i in ids):
            try:
                host = self.get_vm(job.namespace, job.vm, as_stored=True).host
            except NotFound:
                host = job.host
            out.append(Released(job.id, host, job.namespace, job.vm))
        return out

    def woken(self, released: Iterable[Released]) -> None:
        ids = [r.id for r in released]
        if ids:
            self.redis.zrem(keys.RELEASED, *ids)

    # -- reading ------------------------------------------------------------------------

    def get_job(self, job_id: int) -> Job:
        data = as_hash(self.redis.hgetall(keys.job(job_id)))
        if not data:
            raise NotFound(f"no job {job_id}", hint="list jobs with 'vmorch job list'")
        return Job.from_hash(data)

    def get_jobs(self, ids: Iterable[int]) -> list[Job]:
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        return [Job.from_hash(h) for h in pipe.execute() if h]

    def list_jobs(self, namespace: str, *, vm: str | None = None, state: JobState | None = None,
                  op: Op | None = None, limit: int = 50, before: int | None = None) -> list[Job]:
        """Newest first, ids below ``before`` if given (the next page's cursor).

        Filters are applied while paging back through the namespace's index.
        """
        out: list[Job] = []
        start, page = 0, max(limit, 100)
        top = f"({before}" if before is not None else "+inf"
        while len(out) < limit:
            ids = cast(list[str], self.redis.zrevrangebyscore(keys.jobs(namespace), top, "-inf", start=start,
                                                              num=page))
            if not ids:
                break
            start += len(ids)
            for job in self.get_jobs(int(i) for i in ids):
                if (vm is None or job.vm == vm) and (state is None or job.state is state) \
                        and (op is None or job.op is op):
                    out.append(job)
                    if len(out) == limit:
                        break
        return out

    def mailbox(self, namespace: str, vm: str, *, upto_seq: int | None = None) -> list[tuple[int, int]]:
        """(job id, seq) of the VM's unfinished jobs, in sequence order, up to ``upto_seq``."""
        hi: float | str = upto_seq if upto_seq is not None else "+inf"
        rows = cast(list[tuple[str, float]],
                    self.redis.zrangebyscore(keys.vm_mailbox(namespace, vm), "-inf", hi, withscores=True))
        return [(int(i), int(s)) for i, s in rows]

    def turn(self, namespace: str, vm: str, job_id: int) -> Turn:
        """The mailbox up to ``job_id``'s place, the job and the VM record, in one step.

        Nothing pending if the job is final (it left the mailbox) or unknown.
        # LOCK: the caller holds vm:<ns>:<vm>.
        """
        rows, job, record = self.scripts.run("turn", Keys(mailbox=keys.vm_mailbox(namespace, vm), job=keys.job(job_id),
                                                          vm=keys.vm(namespace, vm)), {"id": job_id})
        pending = [(int(i), int(float(sc))) for i, sc in zip(rows[::2], rows[1::2], strict=True)]
        found: Vm | NotFound = Vm.model_validate_json(record) if record else no_vm(namespace, vm)
        return Turn(pending, Job.from_hash(pairs(job)) if job else None, found)

    def next_jobs(self, namespace: str) -> list[Job]:
        """The first unfinished job of every VM of the namespace (the one its worker should run now)."""
        names = self.vm_names(namespace)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zrange(keys.vm_mailbox(namespace, name), 0, 0)
        return self.get_jobs(int(box[0]) for box in pipe.execute() if box)

    def vm_queue(self, namespace: str, vm: str) -> list[Job]:
        """The VM's unfinished jobs in the order they will run: the running one first, if any."""
        return [j for j in self.get_jobs(i for i, _ in self.mailbox(namespace, vm)) if not j.state.final]

    # -- running (worker side) ----------------------------------------------------------

    def mark_waiting(self, namespace: str, job_id: int, worker: str) -> None:
        """A worker has the job's message and waits for the VM's turn (from queued only)."""
        ks = Keys(job=keys.job(job_id), updates=keys.UPDATES, events=keys.events(namespace))
        self.scripts.run("mark_waiting", ks, {"id": job_id, "by": worker})

    def begin(self, job: Job, fence: Fence, worker: str) -> int | None:
        """Start an attempt; return its number, or None if the job is already final.

        # LOCK: the caller holds vm:<ns>:<vm> with ``fence``.
        """
        ks = Keys(job=keys.job(job.id), fence=fence.key, updates=keys.UPDATES, events=keys.events(job.namespace))
        args: dict[str, Any] = {"token": fence.token, "id": job.id, "by": worker}
        if job.parent is not None:
            ks.name(parent=keys.job(job.parent))
            args["parent"] = job.parent
        started, attempts = self.scripts.run("begin", ks, args)
        return int(attempts) if int(started) else None

    def finish(self, job: Job, fence: Fence, state: JobState, *, result: Mapping[str, Any] | None = None,
               error: VmorchError | None = None, vm_update: Mapping[str, Any] | None = None,
               delete_vm: bool = False, by: str = "",
               adjust: Iterable[tuple[str, int, int]] = ()) -> Finished:
        """Make a job final and apply its effect on the VM record in one fenced step.

        Its parent and the jobs that depend on it follow in the same step (``lua/settle.lua``);
        the caller wakes the released ones (``Finished.released``).

        # LOCK: the caller holds vm:<ns>:<vm> with ``fence``.
        """
        ns, vm = job.namespace, job.vm
        ks = Keys(job=keys.job(job.id), fence=fence.key, mailbox=keys.vm_mailbox(ns, vm), vm=keys.vm(ns, vm),
                  vms=keys.vms(ns), host_vms=keys.host_vms(job.host), events=keys.events(ns), **settle_keys())
        args: dict[str, Any] = {
            "token": fence.token, "id": job.id, "state": state.value, "vm": vm, "by": by, "delete": delete_vm,
            "error": json.dumps(error.to_dict()) if error else "",
            "result": json.dumps(dict(result)) if result is not None else "",
            "detail": f"{error.code}: {error.message}" if error else str((result or {}).get("note", "")),
            "adjust": [{"host": ks.at(keys.host(h)), "mib": mib, "vcpus": vcpus} for h, mib, vcpus in adjust]}
        if vm_update:
            update = {k: field(v) for k, v in vm_update.items()}
            args.update(update=update, update_text=json.dumps(update))
            if "host" in update:
                ks.name(target_vms=keys.host_vms(update["host"]))
        done = self.scripts.run("finish", ks, args)
        return Finished(bool(int(done[0])), released_from(done[1:]))

    def cancel_requested_by(self, job_id: int) -> str | None:
        return cast(str | None, self.redis.hget(keys.job(job_id), "cancel_requested")) or None

    def cancel(self, job_id: int, who: str) -> tuple[str, list[Released]]:
        """Cancel a job: returns 'canceled', 'requested' (it is running) or its final state, and the
        jobs released by it (those waiting for it to be final, whatever its state)."""
        job = self.get_job(job_id)
        ks = Keys(job=keys.job(job_id), mailbox=keys.vm_mailbox(job.namespace, job.vm),
                  events=keys.events(job.namespace), **settle_keys())
        res = self.scripts.run("cancel", ks, {"id": job_id, "by": who,
                                              "error": json.dumps(Canceled(f"canceled by {who}").to_dict())})
        return str(res[0]), released_from(res[1:])
