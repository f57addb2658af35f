"""The job store: jobs, the VM registry and hosts, as they live in Redis.

Every change that touches more than one key is one Lua script (``orchestrator.scripts``).
Writes made under a lock carry the lock's ``Fence`` and are refused when a newer token
was issued since (guarantee 3).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis
from redis.exceptions import ResponseError

from orchestrator.model import metrics
from orchestrator.model.errors import AlreadyExists, FencedOut, InvalidInput, NotFound, VmorchError
from orchestrator.model.operation import LaunchParams, MoveInParams, Op, Operation
from orchestrator.model.records import (
    Event,
    Host,
    HostState,
    Job,
    JobState,
    Namespace,
    Vm,
    domain_name,
    host_state,
    vms_from_json,
)
from orchestrator.store import keys, scripts


@dataclass(frozen=True)
class Fence:
    """Proof of holding a lock: the fencing counter's key and the token this holder got."""

    key: str
    token: int


@dataclass(frozen=True)
class Submitted:
    id: int
    seq: int  # 0: held until its dependencies are met
    host: str
    #: the job as it was accepted
    job: Job


@dataclass(frozen=True)
class Turn:
    """What a worker reads first under a VM's lock, in one round trip."""

    #: (job id, seq) of the VM's unfinished jobs up to the message's, in sequence order
    pending: list[tuple[int, int]]
    #: the message's job, read again under the lock (None if it is gone)
    job: Job | None
    #: the VM record as stored, or a NotFound if there is none
    vm: Vm | NotFound


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as a Lua script returns it: its fields and values, flat."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@dataclass(frozen=True)
class Released:
    """A job whose dependencies were just met: it is in its VM's mailbox and needs a wake-up."""

    id: int
    host: str
    namespace: str
    vm: str


@dataclass(frozen=True)
class Finished:
    """What ``Store.finish`` did: whether the job became final now, and the jobs that released."""

    done: bool
    released: list[Released]

    def __bool__(self) -> bool:
        return self.done


@dataclass(frozen=True)
class BatchEntry:
    """One entry of ``Store.submit_batch``: a job on an existing VM, a launch (with its placement) or a move."""

    op: Operation
    host: str = ""  # launch: the chosen host; move: the target
    source: str = ""  # move: the VM's current host
    retry_of: int | None = None


def _released(flat: list[Any]) -> list[Released]:
    return [Released(int(flat[i]), str(flat[i + 1]), str(flat[i + 2]), str(flat[i + 3]))
            for i in range(0, len(flat), 4)]


def _hash(value: object) -> dict[str, str]:
    return cast(dict[str, str], value)  # every client vmorch makes decodes responses to str


class Store:
    def __init__(self, redis: Redis, *, host_down_after: float = 6.0) -> None:
        self.redis = redis
        self.host_down_after = host_down_after
        self._mark_waiting = redis.register_script(scripts.MARK_WAITING)
        self._begin = redis.register_script(scripts.BEGIN)
        self._finish = redis.register_script(scripts.FINISH)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._update_vm = redis.register_script(scripts.UPDATE_VM)
        self._vms_json = redis.register_script(scripts.VMS_JSON)
        self._turn = redis.register_script(scripts.TURN)
        self._submit_batch = redis.register_script(scripts.SUBMIT_BATCH)
        self._fail_unsent = redis.register_script(scripts.FAIL_UNSENT)
        self._release_due = redis.register_script(scripts.RELEASE_DUE)

    # -- submitting ---------------------------------------------------------------------

    def submit_batch(self, entries: list[BatchEntry], *, who: str = "", parent: Mapping[str, Any] | None = None,
                     after: Mapping[int, str] | None = None, delay_s: float = 0.0,
                     fail_on_failed_dep: bool = False) -> tuple[int | None, list[Submitted]]:
        """Accept a batch of jobs, with their parent and their dependencies, in one atomic step.

        ``after`` maps a job id to "ok" (it must succeed) or "final" (any final state will do).
        ``parent``: ``{"namespace", "params"[, "retry_of"]}`` to make one parent job over them all.
        ``delay_s``: once its dependencies are met (or at once), each job waits this long for its turn.
        ``fail_on_failed_dep``: a dependency that already failed fails the jobs at once, as it would have
        had it failed a moment later (else the batch is refused).
        # LOCK: see scripts.SUBMIT_BATCH (launches and moves need their placement locks held).
        """
        jobs: list[dict[str, Any]] = []
        for e in entries:
            o = e.op
            entry: dict[str, Any] = {"t": "plain", "ns": o.namespace, "vm": o.vm, "op": o.op.value,
                                     "params": o.params.model_dump_json()}
            if e.retry_of is not None:
                entry["retry_of"] = e.retry_of
            if o.op is Op.LAUNCH:
                p = o.params
                assert isinstance(p, LaunchParams)
                entry.update(t="launch", host=e.host, mib=p.memory_mib, vcpus=p.vcpus, disk=p.disk_gib,
                             image=p.image or "", tags=json.dumps(p.tags), domain=domain_name(o.namespace, o.vm))
            elif o.op is Op.MOVE_OUT:
                entry.update(t="move", source=e.source, target=e.host,
                             in_params=MoveInParams(source=e.source).model_dump_json())
            jobs.append(entry)
        deps = {str(k): v for k, v in (after or {}).items()}
        request: dict[str, Any] = {"who": who, "after": deps, "after_json": json.dumps(sorted(int(k) for k in deps))
                                   if deps else "", "jobs": jobs, "delay": delay_s,
                                   "fail_on_failed_dep": fail_on_failed_dep}
        if parent is not None:
            request["parent"] = {"ns": parent["namespace"], "params": json.dumps(parent["params"]),
                                 **({"retry_of": parent["retry_of"]} if parent.get("retry_of") else {})}
        try:
            res = self._submit_batch(keys=[], args=[keys.KEY_PREFIX, json.dumps(request)])
        except ResponseError as exc:
            raise _batch_error(exc, entries) from None
        parent_id = int(res[0]) or None
        flat = res[1:]
        return parent_id, [Submitted(int(flat[i]), int(flat[i + 1]), str(flat[i + 2]),
                                     Job.from_hash(_pairs(flat[i + 3]))) for i in range(0, len(flat), 4)]

    def fail_unsent(self, submitted: Submitted, reason: str) -> list[Released]:
        """A job accepted but whose message could not be sent: make it final, not stranded."""
        error = json.dumps({"code": "enqueue_failed", "message": reason})
        return _released(self._fail_unsent(keys=[], args=[keys.KEY_PREFIX, submitted.id, error, ""]))

    def release_due(self, by: str = "") -> list[Released]:
        """Give the delayed jobs whose time has come their place in their VMs' order."""
        return _released(self._release_due(keys=[], args=[keys.KEY_PREFIX, by]))

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
        data = _hash(self.redis.hgetall(keys.job(job_id)))
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
        rows, job, record = self._turn(keys=[keys.vm_mailbox(namespace, vm), keys.job(job_id), keys.vm(namespace, vm)],
                                       args=[job_id])
        pending = [(int(i), int(float(sc))) for i, sc in zip(rows[::2], rows[1::2], strict=True)]
        found: Vm | NotFound = Vm.model_validate_json(record) if record else _no_vm(namespace, vm)
        return Turn(pending, Job.from_hash(_pairs(job)) if job else None, found)

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

    def lock_holder(self, lock_name: str) -> str | None:
        """The id ("<owner>:<pid>:<random>") of whoever holds ``lock_name`` now, or None."""
        return cast(str | None, self.redis.get(keys.lock_key(lock_name)))

    def get_vm(self, namespace: str, name: str, *, as_stored: bool = False) -> Vm:
        """The VM; its state is ``unknown`` while its host is down, unless ``as_stored``."""
        found = self._read_vms([keys.vm(namespace, name)])
        if not found:
            raise _no_vm(namespace, name)
        vm = found[0]
        return vm if as_stored or self._host_up(vm.host) else vm.on_down_host()

    def vm_names(self, namespace: str) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.vms(namespace))))

    def list_vms(self, namespace: str) -> list[Vm]:
        up = {h.name for h in self.hosts() if h.state is not HostState.DOWN}
        vms = self._read_vms([keys.vm(namespace, name) for name in self.vm_names(namespace)])
        return [vm if vm.host in up else vm.on_down_host() for vm in vms]

    def _read_vms(self, vm_keys: list[str], batch: int = 1000) -> list[Vm]:
        """VM records (missing ones left out), read and built as JSON ``batch`` keys per script call."""
        out: list[Vm] = []
        for start in range(0, len(vm_keys), batch):
            out += vms_from_json(self._vms_json(keys=vm_keys[start:start + batch]))
        return out

    # -- namespaces ---------------------------------------------------------------------

    def schedule_names(self, namespace: str) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.schedules(namespace))))

    def namespace(self, name: str) -> Namespace | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.namespace(name))
        pipe.scard(keys.vms(name))
        data, count = pipe.execute()
        return Namespace.from_hash(name, _hash(data), vms=int(count)) if data else None

    def namespaces(self) -> list[Namespace]:
        names = sorted(cast(set[str], self.redis.smembers(keys.NAMESPACES)))
        found = (self.namespace(n) for n in names)
        return [ns for ns in found if ns is not None]

    def create_namespace(self, name: str, hosts: list[str] | None) -> Namespace:
        """# LOCK: the caller holds cmd:<name>."""
        pipe = self.redis.pipeline()
        pipe.sadd(keys.NAMESPACES, name)
        pipe.hset(keys.namespace(name), mapping={"created_at": f"{self.redis_time():.6f}",
                                                 "hosts": json.dumps(sorted(hosts)) if hosts else "",
                                                 "state": "active"})
        pipe.execute()
        created = self.namespace(name)
        assert created is not None
        return created

    def mark_namespace_deleting(self, name: str) -> None:
        """# LOCK: the caller holds cmd:<name>."""
        self.redis.hset(keys.namespace(name), "state", "deleting")

    def purge_namespace(self, name: str) -> int:
        """Remove an empty namespace and its history. Returns how many keys went.

        # LOCK: the caller holds cmd:<name> and has checked the registry is empty.
        Fencing counters stay: a lock's tokens must never go backwards, even if the name comes back.
        """
        ids = [int(i) for i in cast(list[str], self.redis.zrange(keys.jobs(name), 0, -1))]
        doomed = [k for i in ids for k in (keys.job(i), keys.job_children(i), keys.job_dependents(i))]
        doomed += [keys.jobs(name), keys.events(name), keys.namespace(name), keys.vms(name), keys.runs(name)]
        doomed += [keys.run(int(i)) for i in cast(list[str], self.redis.zrange(keys.runs(name), 0, -1))]
        doomed += list(cast(Iterable[str], self.redis.scan_iter(f"{keys.PREFIX}:vm:{name}:*", count=1000)))
        removed = 0
        for start in range(0, len(doomed), 1000):
            removed += int(self.redis.delete(*doomed[start:start + 1000]))
        self.redis.srem(keys.NAMESPACES, name)
        return removed

    # -- hosts --------------------------------------------------------------------------

    def hosts(self) -> list[Host]:
        names = sorted(cast(set[str], self.redis.smembers(keys.HOSTS)))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.host(name))
            pipe.scard(keys.host_vms(name))
        raw = pipe.execute()
        now = self.redis_time()
        return [Host.from_hash(_hash(data), now=now, down_after=self.host_down_after, vms=int(count))
                for data, count in zip(raw[::2], raw[1::2], strict=True) if data]

    def host(self, name: str) -> Host:
        for host in self.hosts():
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts()) or "none registered"
        raise NotFound(f"unknown host {name!r}", hint=f"known hosts: {known} (see 'vmorch host list')")

    def _host_up(self, name: str) -> bool:
        data = _hash(self.redis.hgetall(keys.host(name)))
        return bool(data) and host_state(data, now=self.redis_time(),
                                         down_after=self.host_down_after) is not HostState.DOWN

    def redis_time(self) -> float:
        sec, usec = self.redis.time()
        return sec + usec / 1e6

    def register_host(self, name: str, fields: Mapping[str, Any]) -> None:
        now = self.redis_time()
        pipe = self.redis.pipeline()
        pipe.sadd(keys.HOSTS, name)
        pipe.hset(keys.host(name), mapping={"name": name, "started_at": f"{now:.6f}",
                                            "heartbeat_at": f"{now:.6f}", "stopped": "",
                                            **{k: str(v) for k, v in fields.items()}})
        pipe.execute()

    def heartbeat(self, name: str, fields: Mapping[str, str] | None = None) -> None:
        """Record a heartbeat (Redis's clock), this host's clock offset to it, and ``fields``."""
        before = time.time()
        now = self.redis_time()
        offset = (before + time.time()) / 2 - now  # off by at most half a round trip
        mapping: dict[str, str] = {"heartbeat_at": f"{now:.6f}", "clock_offset": f"{offset:.6f}", **(fields or {})}
        self.redis.hset(keys.host(name), mapping=mapping)  # type: ignore[arg-type]

    def set_draining(self, name: str, draining: bool) -> Host:
        """A draining host gets no new VMs; its VMs and their jobs carry on."""
        self.host(name)  # NotFound for an unknown host
        self.redis.hset(keys.host(name), "draining", "1" if draining else "")
        return self.host(name)

    def host_stopped(self, name: str) -> None:
        """A clean worker shutdown: the host is down now, not after the heartbeat times out."""
        self.redis.hset(keys.host(name), "stopped", "1")

    def vms_on_host(self, name: str) -> list[tuple[str, str]]:
        members = cast(set[str], self.redis.smembers(keys.host_vms(name)))
        return sorted((ns, vm) for ns, _, vm in (m.partition("/") for m in members))

    # -- running (worker side) ----------------------------------------------------------

    def mark_waiting(self, namespace: str, job_id: int, worker: str) -> None:
        """A worker has the job's message and waits for the VM's turn (from queued only)."""
        self._mark_waiting(keys=[keys.job(job_id), keys.UPDATES, keys.events(namespace)], args=[job_id, worker])

    def begin(self, job: Job, fence: Fence, worker: str) -> int | None:
        """Start an attempt; return its number, or None if the job is already final.

        # LOCK: the caller holds vm:<ns>:<vm> with ``fence``.
        """
        try:
            started, attempts = self._begin(keys=[keys.job(job.id), fence.key, keys.UPDATES,
                                                  keys.events(job.namespace)],
                                            args=[fence.token, job.id, worker, keys.JOB_PREFIX])
        except ResponseError as exc:
            raise _script_error(exc) from None
        return int(attempts) if int(started) else None

    def finish(self, job: Job, fence: Fence, state: JobState, *, result: Mapping[str, Any] | None = None,
               error: VmorchError | None = None, vm_update: Mapping[str, Any] | None = None,
               delete_vm: bool = False, by: str = "",
               adjust: Iterable[tuple[str, int, int]] = ()) -> Finished:
        """Make a job final and apply its effect on the VM record in one fenced step.

        Its parent and the jobs that depend on it follow in the same step (``scripts._SETTLE``);
        the caller wakes the released ones (``Finished.released``).

        # LOCK: the caller holds vm:<ns>:<vm> with ``fence``.
        """
        ns, vm = job.namespace, job.vm
        update = json.dumps({k: _field(v) for k, v in vm_update.items()}) if vm_update else ""
        try:
            done = self._finish(
                keys=[keys.job(job.id), fence.key, keys.vm_mailbox(ns, vm), keys.vm(ns, vm), keys.vms(ns),
                      keys.host_vms(job.host), keys.UPDATES, keys.events(ns)],
                args=[fence.token, job.id, state.value,
                      json.dumps(error.to_dict()) if error else "",
                      json.dumps(dict(result)) if result is not None else "", update,
                      "1" if delete_vm else "0", vm, by,
                      f"{error.code}: {error.message}" if error else str((result or {}).get("note", "")),
                      keys.HOST_PREFIX, json.dumps([list(a) for a in adjust]) if adjust else "", keys.KEY_PREFIX],
            )
        except ResponseError as exc:
            raise _script_error(exc) from None
        return Finished(bool(int(done[0])), _released(done[1:]))

    def update_vm(self, namespace: str, name: str, fence: Fence, fields: Mapping[str, Any], by: str = "") -> bool:
        """Change fields of a VM record; False if the VM no longer exists.

        # LOCK: the caller holds vm:<ns>:<name> with ``fence``.
        """
        try:
            done = self._update_vm(keys=[keys.vm(namespace, name), fence.key, keys.events(namespace)],
                                   args=[fence.token, json.dumps({k: _field(v) for k, v in fields.items()}), name, by])
        except ResponseError as exc:
            raise _script_error(exc) from None
        return bool(done)

    def cancel_requested_by(self, job_id: int) -> str | None:
        return cast(str | None, self.redis.hget(keys.job(job_id), "cancel_requested")) or None

    def cancel(self, job_id: int, who: str) -> tuple[str, list[Released]]:
        """Cancel a job: returns 'canceled', 'requested' (it is running) or its final state, and the
        jobs released by it (those waiting for it to be final, whatever its state)."""
        job = self.get_job(job_id)
        error = json.dumps({"code": "canceled", "message": f"canceled by {who}"})
        res = self._cancel(keys=[keys.job(job_id), keys.vm_mailbox(job.namespace, job.vm), keys.UPDATES,
                                 keys.events(job.namespace)],
                           args=[job_id, error, who, keys.KEY_PREFIX])
        return str(res[0]), _released(res[1:])

    # -- history ------------------------------------------------------------------------

    def add_event(self, namespace: str | None, *, kind: str, state: str, by: str, detail: str = "",
                  vm: str = "", op: str = "") -> None:
        """Record a change that is not a job's (a namespace made, a host drained) and who asked.

        ``namespace=None``: a cluster-wide change, recorded in the audit stream.
        """
        stream = keys.events(namespace) if namespace is not None else keys.AUDIT
        self.redis.xadd(stream, {"at": f"{self.redis_time():.6f}", "kind": kind, "job": "", "vm": vm, "op": op,
                                 "state": state, "by": by, "detail": detail}, maxlen=100_000)

    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]:
        """The newest ``limit`` events matching, oldest first."""
        out: list[Event] = []
        last = "+"
        while len(out) < limit:
            batch = cast(list[tuple[str, dict[str, str]]],
                         self.redis.xrevrange(keys.events(namespace), max=last, count=500))
            if last != "+":
                batch = batch[1:]  # the boundary entry was in the previous batch
            if not batch:
                break
            for entry_id, fields in batch:
                if (vm is None or fields.get("vm") == vm) and (job_id is None or fields.get("job") == str(job_id)):
                    out.append(Event.from_fields(entry_id, fields))
                    if len(out) == limit:
                        break
            last = batch[-1][0]
        return out[::-1]


def _field(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _batch_error(exc: ResponseError, entries: list[BatchEntry]) -> VmorchError:
    words = str(exc).split()
    reason, arg = words[0], words[1] if len(words) > 1 else ""
    if reason == "unknown_dep":
        return NotFound(f"no job {arg} to wait for", hint="list jobs with 'vmorch job list'")
    if reason == "dep_failed":
        return InvalidInput(f"job {arg} to wait for is already {words[2]}",
                            hint=f"retry it first ('vmorch job retry {arg}'), or drop it from --after")
    if reason == "moved" and arg.isdigit():
        op = entries[int(arg) - 1].op
        return InvalidInput(f"VM {op.vm!r} is no longer on host {entries[int(arg) - 1].source!r}",
                            hint="it moved meanwhile; see 'vmorch vm show'")
    if arg.isdigit():
        return _script_error(exc, entries[int(arg) - 1].op)
    return _script_error(exc)


def _script_error(exc: ResponseError, op: Operation | None = None) -> VmorchError:
    text = str(exc)
    where = f" in namespace {op.namespace!r}" if op else ""
    if "already_exists" in text and op:
        return AlreadyExists(f"VM {op.vm!r} already exists{where}",
                             hint="pick another name, or delete it first with 'vmorch vm delete'")
    if "not_found" in text:
        name = f"VM {op.vm!r}" if op else "job"
        return NotFound(f"no {name}{where}", hint="list VMs with 'vmorch vm list' (and check --namespace)")
    if "fenced_out" in text:
        metrics.fenced_out()
        return FencedOut("a newer holder took this lock; this write was refused",
                         hint="the job is retried by the new holder")
    raise exc


def _no_vm(namespace: str, name: str) -> NotFound:
    return NotFound(f"no VM {name!r} in namespace {namespace!r}",
                    hint="list VMs with 'vmorch vm list' (and check --namespace)")
