"""Accepting operations: validation of a whole batch, placement under the locks, the store's
submit script, and the wake-up messages. Every job enters the cluster through ``Submitting.submit``."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from orchestrator.control import deps, locks, placement
from orchestrator.control.connection import Connection
from orchestrator.control.images import image_lock
from orchestrator.control.locks import LockName, cmd_lock, host_lock, vms_lock
from orchestrator.model.errors import AlreadyExists, ClusterUnavailable, InvalidInput, NotFound
from orchestrator.model.operation import LaunchParams, MoveOutParams, Op, Operation, SetParams, SubmitOptions
from orchestrator.model.records import Host, HostState, Job, JobState, Vm
from orchestrator.store import keys
from orchestrator.store.images import ImageRecords
from orchestrator.store.jobstore import AlreadyAccepted, BatchEntry, Submitted
from orchestrator.store.networks import NetworkRecords


class Submitting(Connection):
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
        try:
            return self._accept(ops, opts, retry_of)
        except AlreadyAccepted as repeat:  # the same idempotency key as an earlier submit: its jobs
            return self.store.get_jobs(repeat.job_ids)

    def _repeated(self, opts: SubmitOptions) -> None:
        """Raise ``AlreadyAccepted`` if a submit with this idempotency key was accepted before: checked
        first (a repeat must not be judged again: its launch's name is taken now, its deleted VM gone),
        again under the placement locks, and atomically by the submit script."""
        if opts.idempotency_key is not None and (seen := self.store.accepted_before(opts.idempotency_key)):
            raise AlreadyAccepted(seen)

    def _accept(self, ops: list[Operation], opts: SubmitOptions, retry_of: Sequence[int | None] | None) -> list[Job]:
        self._repeated(opts)
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
            self._repeated(opts)  # two launches with one key: the second waited for the first's locks
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
            # LOCK: all -- a launch's name, reservation, host and image; a move's reservation on its target
            locks.require(*(lock for o in launches for lock in (cmd_lock(o.namespace), vms_lock(o.namespace))),
                          *(image_lock(i) for i in _images(launches)),
                          *(host_lock(h) for h in set(chosen.values()) | set(sources.values())),
                          *(host_lock(e.host) for e in entries if e.op.op is Op.MOVE_OUT))
            _, submitted = self.store.submit_batch(entries, who=self.actor, parent=parent, after=after,
                                                   delay_s=opts.delay_s,
                                                   fail_on_failed_dep=opts.if_dependency_failed == "fail",
                                                   idempotency_key=opts.idempotency_key)
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
            if op.op is Op.SET and isinstance(p := op.params, SetParams) and p.nic is not None:
                self._check_nic(op, p)
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
        A move: cmd for the placement decision, both hosts for the reservation and the hand-over.
        image:<name> of each catalog image launched from: a removal of it waits, or refuses these VMs."""
        names: list[LockName] = []
        by_ns: dict[str, list[Operation]] = defaultdict(list)
        for op in launches:
            by_ns[op.namespace].append(op)
        all_candidates: set[str] = set()
        for ns, batch in by_ns.items():
            candidates = self._candidate_hosts(ns, batch)
            all_candidates |= set(candidates)
            names += [cmd_lock(ns), vms_lock(ns), *(host_lock(h) for h in candidates)]
        names += [image_lock(i) for i in _images(launches)]
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
        locks.require(cmd_lock(ns), host_lock(vm.host), host_lock(p.to))
        info = self.store.namespace(ns)
        allowed = set(info.hosts) if info is not None and info.hosts else None
        limits = placement.Limits(self.settings.memory_allocation_ratio, self.settings.cpu_allocation_ratio)
        # the room it holds where it is (lua/reserve.lua): the larger of what is set and what runs
        held = max(vm.memory_mib, vm.memory_mib_live or 0), max(vm.vcpus, vm.vcpus_live or 0)
        placement.plan([placement.Request(vm.name, *held, host=p.to)],
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
        """# LOCK: for a real launch (``locked``) the caller holds cmd:<ns>, vms:<ns> and the candidate hosts'
        locks."""
        if locked is not None:
            locks.require(cmd_lock(ns), vms_lock(ns), *(host_lock(h) for h in locked))
        info = self.store.namespace(ns)
        if info is not None and info.state == "deleting":
            raise InvalidInput(f"namespace {ns!r} is being deleted", hint="use another namespace, or wait")
        self._check_nets(ns, batch)  # LOCK: cmd -- a network's deletion holds it too
        taken = [op.vm for op in batch if self.redis.sismember(keys.vms(ns), op.vm)]
        if taken:
            raise AlreadyExists(f"VM {taken[0]!r} already exists in namespace {ns!r}"
                                + (f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""),
                                hint="pick other names, or delete them first with 'vmorch vm delete'")
        hosts = self.store.hosts()  # all of them, so a refusal can say exactly what is missing
        ready = self._images_ready(_images(batch))  # LOCK: image:<name> for a real launch (a removal waits)
        requests, spread = [], False
        for op in batch:
            p = op.params
            assert isinstance(p, LaunchParams)
            colocate_host = self.store.get_vm(ns, p.colocate).host if p.colocate else None
            requests.append(placement.Request(op.vm, p.memory_mib, p.vcpus, p.host, p.host_labels, colocate_host,
                                              p.image, ready.get(p.image or ""), p.disk_gib))
            spread = spread or p.spread
        limits = placement.Limits(self.settings.memory_allocation_ratio, self.settings.cpu_allocation_ratio,
                                  self.settings.disk_margin_gib)
        allowed = set(info.hosts) if info is not None and info.hosts else None
        chosen = placement.plan(requests, hosts, allowed=allowed, spread=spread, limits=limits)
        unlocked = sorted(set(chosen.values()) - locked) if locked is not None else []
        if unlocked:  # only when a host came up between choosing what to lock and deciding
            raise ClusterUnavailable(f"host {unlocked[0]!r} joined during placement", hint="submit again")
        return chosen

    def _check_nic(self, op: Operation, p: SetParams) -> None:
        """Refuse link emulation on a NIC the VM doesn't have, or that its host's kernel can't do."""
        assert p.nic is not None and p.shaping is not None
        vm = self.store.get_vm(op.namespace, op.vm)
        if p.nic >= len(vm.nics):
            raise InvalidInput(f"VM {op.vm!r} has {len(vm.nics)} NIC(s) on vmorch networks; there is no NIC {p.nic}",
                               hint=f"see 'vmorch vm show {op.vm}' (NICs count from 0; a VM gets them with --net)")
        can = set(self.store.host(vm.host).shaping.split(",")) - {""}
        wanted = {"delay": p.shaping.delay_ms, "loss": p.shaping.loss_pct, "rate": p.shaping.rate_kbit}
        missing = sorted(k for k, v in wanted.items() if v and k not in can)
        if missing:
            raise InvalidInput(f"host {vm.host!r} can't emulate {' or '.join(missing)} (its kernel offers: "
                               f"{', '.join(sorted(can)) or 'nothing'})",
                               hint="tc netem is missing there (CONFIG_NET_SCH_NETEM); --rate needs only tbf")

    def _check_nets(self, ns: str, batch: list[Operation]) -> None:
        """Refuse launches onto a network that doesn't exist or is being deleted."""
        names = sorted({n for op in batch if isinstance(p := op.params, LaunchParams) for n in p.nets})
        records = NetworkRecords(self.redis)
        for name in names:
            if records.require(ns, name).state == "deleting":
                raise InvalidInput(f"network {name!r} is being deleted", hint="pick another network")

    def _images_ready(self, names: list[str]) -> dict[str, frozenset[str]]:
        """The hosts where each catalog image is ready; NotFound for a name not in the catalog."""
        records = ImageRecords(self.redis, self.store.scripts)
        return {name: frozenset(records.require(name).ready_on()) for name in names}

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
        if vm.image and p.to not in self._images_ready([vm.image]).get(vm.image, frozenset()):
            # Refused, not carried along: an image is imported by an admin, from its source, on purpose.
            raise InvalidInput(f"cannot move VM {op.vm!r} to {p.to!r}: its image {vm.image!r} is not ready there",
                               hint=f"have an admin import it there first ('vmorch image import {vm.image} SOURCE "
                                    f"--host {p.to}'), or pick a host that has it ('vmorch image show {vm.image}')")
        if p.live and vm.nics:
            raise InvalidInput(f"VM {op.vm!r} has NICs on vmorch networks; it can only move shut off",
                               hint="stop it, move it without --live, start it (its networks follow it)")
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

    def _enqueue(self, accepted: list[tuple[Submitted, Operation]]) -> None:
        from orchestrator.control.queue import WakeUp, enqueue_many

        by_id = {s.id: s for s, _ in accepted}
        for w, exc in enqueue_many(self.celery, (WakeUp(s.host, op.namespace, op.vm, s.id) for s, op in accepted)):
            # the broker refused: the job must not stay queued forever
            deps.wake(self.celery, self.store, self.store.fail_unsent(by_id[w.job_id], f"could not enqueue: {exc}"))



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


def _images(launches: Sequence[Operation]) -> list[str]:
    """The catalog images a batch of launches is made from, sorted, once each."""
    return sorted({p.image for o in launches if isinstance(p := o.params, LaunchParams) and p.image})


def _label(ops: Sequence[Operation]) -> str:
    names = [o.vm for o in ops]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]} ({len(names)} VMs)"


def _again(job: Job) -> Operation:
    if not isinstance(job.op, Op) or job.op in (Op.MOVE_OUT, Op.MOVE_IN):
        raise InvalidInput(f"job {job.id} ({job.op.value}) can't be retried as it is",
                           hint="move the VM again with 'vmorch vm move'")
    return Operation.build(job.op, job.namespace, job.vm, **job.params)


