"""The client the CLI (and later the HTTP API) calls: the one seam between users and the cluster.

``Client`` is the interface; ``RedisClient`` talks to the job store and the queue directly.
"""

from __future__ import annotations

import copy
import getpass
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError

from . import deps, keys, placement, targets
from .errors import AlreadyExists, ClusterUnavailable, ExecError, InvalidInput, NotFound, VmorchError
from .locks import Holding, LockManager, LockName, cmd_lock, host_lock, vms_lock
from .names import check_namespace
from .operation import LaunchParams, MoveOutParams, Op, Operation, SubmitOptions
from .records import Event, Host, HostState, Job, JobState, Namespace, Vm
from .redisconn import connect, ping
from .runs import ExperimentRun, RunStep, RunStore, derive_state
from .settings import Settings
from .store import BatchEntry, Store, Submitted

if TYPE_CHECKING:
    from celery import Celery

    from . import experiment
    from .schedules import Schedule, ScheduleSpec, ScheduleStore

OnUpdate = Callable[[list[Job]], None]


class Client(Protocol):
    def submit(self, ops: Sequence[Operation], options: SubmitOptions | None = None) -> list[Job]: ...
    def children(self, job_id: int) -> list[Job]: ...
    def retry(self, job_id: int) -> list[Job]: ...
    def run_experiment(self, text: str, *, namespace: str, source: str = "") -> ExperimentRun: ...
    def experiment_run(self, run_id: int) -> ExperimentRun: ...
    def experiment_runs(self, namespace: str, *, limit: int = 20) -> list[ExperimentRun]: ...
    def add_schedule(self, spec: ScheduleSpec) -> Schedule: ...
    def schedule(self, namespace: str, name: str, *, history: int = 10) -> Schedule: ...
    def schedules(self, namespace: str) -> list[Schedule]: ...
    def pause_schedule(self, namespace: str, name: str, paused: bool) -> Schedule: ...
    def remove_schedule(self, namespace: str, name: str) -> None: ...
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
        self.runs = RunStore(self.redis)
        self._schedule_store: ScheduleStore | None = None
        self._locks: LockManager | None = None
        self._celery: Celery | None = None
        self._local = threading.local()
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

    def submit(self, ops: Sequence[Operation], options: SubmitOptions | None = None) -> list[Job]:
        """Accept operations: all of them (with their parent job and dependencies) or, on bad input, none.

        Returns the jobs, in the order of ``ops``; with a parent, each carries its id in ``parent``.
        """
        return self._submit(list(ops), options or SubmitOptions())

    def _submit(self, ops: list[Operation], opts: SubmitOptions,
                retry_of: Sequence[int | None] | None = None) -> list[Job]:
        if not ops:
            raise InvalidInput("no VM to operate on", hint="give a name, a range such as web[1-3], or --tag")
        after = deps.edges(opts.after, opts.after_final, (o.op for o in ops), opts.delay_s)
        self._refuse_bad(ops)
        make_parent = opts.parent if opts.parent is not None else len(ops) > 1
        parent = None
        if make_parent:
            namespaces = sorted({o.namespace for o in ops})
            parent = {"namespace": namespaces[0], "retry_of": opts.retry_of,
                      "params": {"ops": sorted({o.op.value for o in ops}), "label": opts.label or _label(ops)}}
        retries = list(retry_of) if retry_of is not None else [None] * len(ops)
        if retry_of is None and not make_parent:
            retries = [opts.retry_of] * len(ops)
        launches = [o for o in ops if o.op is Op.LAUNCH]
        moves = [o for o in ops if o.op is Op.MOVE_OUT]
        with self._placement_locks(launches, moves) as candidates:
            chosen = self._place_launches(launches, candidates)
            sources = {(o.namespace, o.vm): self._place_move(o) for o in moves}  # LOCK: cmd, hosts
            entries = []
            for op, again in zip(ops, retries, strict=True):
                if op.op is Op.LAUNCH:
                    entries.append(BatchEntry(op, host=chosen[(op.namespace, op.vm)], retry_of=again))
                elif op.op is Op.MOVE_OUT:
                    p = op.params
                    assert isinstance(p, MoveOutParams)
                    entries.append(BatchEntry(op, host=p.to, source=sources[(op.namespace, op.vm)], retry_of=again))
                else:
                    entries.append(BatchEntry(op, retry_of=again))
            _, submitted = self.store.submit_batch(entries, who=self.actor, parent=parent, after=after,  # LOCK: all
                                                   delay_s=opts.delay_s,
                                                   fail_on_failed_dep=opts.if_dependency_failed == "fail")
        by_job = iter(submitted)
        accepted: list[tuple[Submitted, Operation]] = []
        for op in ops:
            accepted.append((next(by_job), op))
            if op.op is Op.MOVE_OUT:
                accepted.append((next(by_job), op))
        self._enqueue([(s, op) for s, op in accepted if s.seq])  # a held job is woken when released
        return [s.job for s, _ in accepted]

    def _refuse_bad(self, ops: list[Operation]) -> None:
        """Refuse the whole batch before accepting any of it (one round trip for all the names)."""
        if any(o.op is Op.MOVE_IN for o in ops):
            raise InvalidInput("move-in jobs are made by 'vm move'", hint="use 'vmorch vm move NAME --to HOST'")
        launches = [o for o in ops if o.op is Op.LAUNCH]
        _check_launches(launches)
        others = [o for o in ops if o.op is not Op.LAUNCH]
        seen: set[tuple[str, str]] = set()
        for op, exists in zip(others, self._exist(others, alone=not launches), strict=True):
            if not exists:
                raise NotFound(f"no VM {op.vm!r} in namespace {op.namespace!r}",
                               hint="list VMs with 'vmorch vm list' (and check --namespace)")
            if op.op is Op.MOVE_OUT:
                # an earlier job of this batch on the same VM (a kill, say) is as good as a pending one
                self._check_move(op, behind_others=(op.namespace, op.vm) in seen)
            seen.add((op.namespace, op.vm))

    def _exist(self, ops: list[Operation], *, alone: bool) -> list[bool]:
        """Whether each operation's VM exists: the whole batch is refused before any of it is accepted.

        One operation on its own skips the read: the submit script refuses a missing VM itself.
        """
        if alone and len(ops) == 1 and ops[0].op is not Op.MOVE_OUT:
            return [True]
        pipe = self.redis.pipeline(transaction=False)
        for op in ops:
            pipe.sismember(keys.vms(op.namespace), op.vm)
        return [bool(e) for e in pipe.execute()]

    @contextmanager
    def _placement_locks(self, launches: list[Operation], moves: list[Operation]) -> Iterator[set[str]]:
        """cmd: the name reservation and placement decision; vms: the registry write; host:*: the
        reservations on every candidate, so placements in other namespaces can't race for the same room.
        A move: cmd for the placement decision, both hosts for the reservation and the hand-over."""
        names: list[LockName] = []
        by_ns: dict[str, list[Operation]] = defaultdict(list)
        for op in launches:
            by_ns[op.namespace].append(op)
        all_candidates: set[str] = set()
        for ns, batch in by_ns.items():
            candidates = self._candidate_hosts(ns, batch)
            all_candidates |= set(candidates)
            names += [cmd_lock(ns), vms_lock(ns), *(host_lock(h) for h in candidates)]
        for op in moves:
            p = op.params
            assert isinstance(p, MoveOutParams)
            names += [cmd_lock(op.namespace), host_lock(self.store.get_vm(op.namespace, op.vm).host), host_lock(p.to)]
        if not names:
            yield all_candidates
            return
        with self.locks.hold(*names, timeout=self.settings.submit_lock_timeout):
            yield all_candidates

    def _place_launches(self, launches: list[Operation], locked: set[str]) -> dict[tuple[str, str], str]:
        """# LOCK: the caller holds the locks of ``_placement_locks``."""
        by_ns: dict[str, list[Operation]] = defaultdict(list)
        for op in launches:
            by_ns[op.namespace].append(op)
        out: dict[tuple[str, str], str] = {}
        for ns, batch in sorted(by_ns.items()):
            for vm, host in self._plan(ns, batch, locked=locked).items():
                out[(ns, vm)] = host
        return out

    def _place_move(self, op: Operation) -> str:
        """Check the target has room for the VM; returns its current host.

        # LOCK: the caller holds cmd:<ns> and both hosts' locks.
        """
        p = op.params
        assert isinstance(p, MoveOutParams)
        ns = op.namespace
        vm = self.store.get_vm(ns, op.vm, as_stored=True)
        info = self.store.namespace(ns)
        allowed = set(info.hosts) if info is not None and info.hosts else None
        limits = placement.Limits(self.settings.memory_allocation_ratio, self.settings.cpu_allocation_ratio)
        placement.plan([placement.Request(vm.name, vm.memory_mib, vm.vcpus, host=p.to)],
                       [h for h in self.store.hosts() if h.name == p.to], allowed=allowed, limits=limits)
        return vm.host

    # -- parents, retries -----------------------------------------------------------------

    def children(self, job_id: int) -> list[Job]:
        """The children of a parent job, oldest first (empty for any other job)."""
        self.store.get_job(job_id)  # NotFound
        return self.store.children(job_id)

    def retry(self, job_id: int) -> list[Job]:
        """Run a failed job again as a new job (``retry_of``); for a parent, its failed children,
        under a new parent (the old one's final state stays what it was: history is not rewritten)."""
        job = self.store.get_job(job_id)
        if not job.state.final:
            raise InvalidInput(f"job {job_id} is {job.state.value}; only a final job can be retried",
                               hint=f"wait for it ('vmorch job wait {job_id}') or cancel it")
        if job.is_parent:
            failed = [c for c in self.store.children(job_id) if c.state is JobState.FAILED]
            if not failed:
                raise InvalidInput(f"no failed job under job {job_id}", hint=f"see 'vmorch job show {job_id}'")
            ops = [_again(c) for c in failed]
            label = str(job.params.get("label") or "")
            return self._submit(ops, SubmitOptions(parent=True, label=label, retry_of=job_id),
                                retry_of=[c.id for c in failed])
        if job.state is JobState.SUCCEEDED:
            raise InvalidInput(f"job {job_id} succeeded; there is nothing to retry",
                               hint="submit the operation again to run it again")
        return self._submit([_again(job)], SubmitOptions(parent=False, retry_of=job_id))

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

    def plan(self, ops: Sequence[Operation]) -> dict[str, str]:
        """Where launches would go, changing nothing (``vm launch --dry-run``)."""
        out: dict[str, str] = {}
        by_ns: dict[str, list[Operation]] = defaultdict(list)
        for op in ops:
            by_ns[op.namespace].append(op)
        for ns, batch in sorted(by_ns.items()):
            out.update(self._plan(ns, batch))
        return out

    # -- experiments ------------------------------------------------------------------------

    def run_experiment(self, text: str, *, namespace: str, source: str = "") -> ExperimentRun:
        """Run an experiment file (its YAML text) as a job graph and record the run.

        Each step is accepted whole or not at all; if a later step is refused (a target that
        matches no VM, say), the steps already accepted are canceled before the error is raised.
        """
        from . import experiment  # imported here: YAML is for experiments only (CLI start-up time)

        exp = experiment.load(text)
        ns = exp.namespace or namespace
        steps: list[RunStep] = []
        try:
            if exp.vms:
                launches = [Operation.build(Op.LAUNCH, ns, n, **spec.launch_params())
                            for spec in exp.vms for n in spec.names()]
                steps.append(RunStep(name="launch", kind="launch",
                                     job=self._submit_step(launches, f"{exp.name}: launch")))
            ids = {s.name: s.job for s in steps}
            previous = [s.name for s in steps]
            for i, step in enumerate(exp.steps):
                name = experiment.step_name(step, i)
                after = step.after if step.after is not None else previous
                job = self._submit_step(self._step_ops(ns, step), f"{exp.name}: {name}",
                                        SubmitOptions(after=[ids[a] for a in after], delay_s=step.wait_s,
                                                      if_dependency_failed="fail"))
                steps.append(RunStep(name=name, kind="step", job=job, after=after))
                ids[name], previous = job, [name]
            before_teardown = list(ids.values())
            for i, step in enumerate(exp.teardown_steps()):
                name = experiment.step_name(step, i, "teardown")
                # final, not succeeded: a teardown runs whatever became of the steps before it
                job = self._submit_step(self._step_ops(ns, step), f"{exp.name}: {name}",
                                        SubmitOptions(after_final=before_teardown, delay_s=step.wait_s))
                steps.append(RunStep(name=name, kind="teardown", job=job, after=list(ids)))
                ids[name] = job
                before_teardown = [*before_teardown, job]
        except VmorchError:
            for s in steps:
                self.cancel(s.job)
            raise
        run_id = self.runs.save(name=exp.name, namespace=ns, source=source, text=text, by=self.actor, steps=steps)
        return self.experiment_run(run_id)

    def _step_ops(self, ns: str, step: experiment.Step) -> list[Operation]:
        names = targets.resolve(self, ns, step.target, step.tag)
        return [Operation.build(step.op, ns, n, **step.params) for n in names]

    def _submit_step(self, ops: list[Operation], label: str, options: SubmitOptions | None = None) -> int:
        opts = (options or SubmitOptions()).model_copy(update={"parent": True, "label": label})
        parent = self.submit(ops, opts)[0].parent
        assert parent is not None
        return parent

    def experiment_run(self, run_id: int) -> ExperimentRun:
        run = self.runs.get(run_id)
        jobs = self.store.get_jobs(s.job for s in run.steps)
        by_id = {j.id: j for j in jobs}
        return run.model_copy(update={"jobs": {s.name: by_id[s.job] for s in run.steps if s.job in by_id},
                                      "state": derive_state(jobs)})

    def experiment_runs(self, namespace: str, *, limit: int = 20) -> list[ExperimentRun]:
        return [self.experiment_run(i) for i in self.runs.ids(namespace, limit)]

    # -- schedules ----------------------------------------------------------------------

    @property
    def _schedules(self) -> ScheduleStore:
        if self._schedule_store is None:
            from .schedules import ScheduleStore  # imported here: cron is for schedules only (CLI start-up time)

            self._schedule_store = ScheduleStore(self)
        return self._schedule_store

    def _schedule_lock(self, namespace: str, name: str) -> AbstractContextManager[Holding]:
        from .schedules import lock

        return self.locks.hold(lock(namespace, name), timeout=self.settings.submit_lock_timeout)

    def add_schedule(self, spec: ScheduleSpec) -> Schedule:
        with self._schedule_lock(spec.namespace, spec.name):
            self._schedules.add(spec, self.actor)  # LOCK: schedule
        return self.schedule(spec.namespace, spec.name)

    def schedule(self, namespace: str, name: str, *, history: int = 10) -> Schedule:
        return self._schedules.get(namespace, name, history=history)

    def schedules(self, namespace: str) -> list[Schedule]:
        store = self._schedules
        return [store.get(namespace, n, history=1) for n in store.names(namespace)]

    def pause_schedule(self, namespace: str, name: str, paused: bool) -> Schedule:
        with self._schedule_lock(namespace, name):
            self._schedules.set_paused(namespace, name, paused)  # LOCK: schedule
        return self.schedule(namespace, name)

    def remove_schedule(self, namespace: str, name: str) -> None:
        with self._schedule_lock(namespace, name):
            self._schedules.remove(namespace, name)  # LOCK: schedule

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
            scheduled = self._schedules.names(name)
            if scheduled:  # they would fire into a namespace that is gone
                raise InvalidInput(f"namespace {name!r} has schedules: {', '.join(scheduled)}",
                                   hint=f"remove them first ('vmorch -n {name} schedule remove NAME')")
            names = self.store.vm_names(name)
            if names and not force:
                raise InvalidInput(f"namespace {name!r} has {len(names)} VMs",
                                   hint="delete them first, or pass --force to delete them with it")
            self.store.mark_namespace_deleting(name)  # LOCK: cmd -- no launch gets in from now on
            deletes = [Operation.build(Op.DELETE, name, vm) for vm in names]
            _, submitted = self.store.submit_batch([BatchEntry(op) for op in deletes], who=self.actor)
            accepted = list(zip(submitted, deletes, strict=True))
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
        from .queue import WakeUp, enqueue_many

        by_id = {s.id: s for s, _ in accepted}
        for w, exc in enqueue_many(self.celery, (WakeUp(s.host, op.namespace, op.vm, s.id) for s, op in accepted)):
            # the broker refused: the job must not stay queued forever
            deps.wake(self.celery, self.store, self.store.fail_unsent(by_id[w.job_id], f"could not enqueue: {exc}"))

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


_FINAL = frozenset(s.value for s in JobState if s.final)


def _label(ops: Sequence[Operation]) -> str:
    names = [o.vm for o in ops]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]} ({len(names)} VMs)"


def _again(job: Job) -> Operation:
    if not isinstance(job.op, Op) or job.op in (Op.MOVE_OUT, Op.MOVE_IN):
        raise InvalidInput(f"job {job.id} ({job.op.value}) can't be retried as it is",
                           hint="move the VM again with 'vmorch vm move'")
    return Operation.build(job.op, job.namespace, job.vm, **job.params)


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
