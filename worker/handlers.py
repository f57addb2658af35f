"""One handler per operation, and the dispatch table (a test asserts it is complete).

A handler is data beside its function (Ganeti's logical units): the params model it takes, the
locks it needs by level (``locks``, taken by ``orchestrator.control.locks`` and nowhere else), and
what a failure gives back. It runs with its locks held (the VM's for the whole operation), gets
the job's ``Operation`` with its typed params (``ctx.op``, ``ctx.params``: the model the CLI
built), and calls ``ctx.check()`` before every side effect, so a lost lock or a cancel request
stops it before it touches libvirt again. It returns an ``Outcome``: the typed result and what
changes in the VM record. The runner writes both in one fenced step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from redis import Redis

from orchestrator.control import locks
from orchestrator.control.locks import Declared, Level, host_lock, vm_lock
from orchestrator.model.errors import ExecError, InvalidInput, LockError, VmGone, VmorchError
from orchestrator.model.operation import (
    CpParams,
    ExecParams,
    LaunchParams,
    MoveInParams,
    MoveOutParams,
    NoParams,
    Op,
    Operation,
    Params,
    RebootParams,
    SetParams,
    SnapshotParams,
    StopParams,
    TagParams,
)
from orchestrator.model.records import Job, JobState, Vm, VmState
from orchestrator.store import keys, transfer
from orchestrator.store.images import ImageRecords
from orchestrator.store.jobstore import Store
from orchestrator.store.networks import NetworkRecords

from . import cloudinit, console, domxml, execs, images, nichandlers
from .driver import DomainSpec, Driver, DriverResult
from .results import HandedOver, Tagged

P = TypeVar("P", bound=Params)
#: reservations to change: (host, MiB, vCPUs)
Adjust = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Outcome:
    result: DriverResult
    vm_update: Mapping[str, Any] | None = None
    delete_vm: bool = False
    adjust: Adjust = ()


@dataclass
class Context(Generic[P]):
    job: Job
    #: the job's operation, rebuilt once from its record; ``params`` is its params, typed
    op: Operation
    params: P
    vm: Vm
    driver: Driver
    #: raises LockLost / Canceled; call before every side effect
    check: Callable[[], None]
    fence_token: int = 0
    store: Store | None = None
    #: a bytes client, for the disk chunks of a move
    blobs: Redis | None = None
    move_max_mib: int = 4096


def operation_of(job: Job) -> Operation:
    """A job's operation, rebuilt from its record with its op's params model."""
    if not isinstance(job.op, Op):
        raise ExecError(f"job {job.id} is a {job.op.value} job: it runs no operation of its own")
    try:
        return Operation.build(job.op, job.namespace, job.vm, **job.params)
    except InvalidInput as exc:
        raise ExecError(f"job {job.id}'s operation can't be read: {exc.message}",
                        hint="it was stored by another version of vmorch; submit it again") from None


def vm_only(ctx: Context[Any]) -> Declared:
    """The locks of most operations: the VM's, for the whole operation."""
    return {Level.VM: [vm_lock(ctx.op.namespace, ctx.op.vm)]}


def _nothing(ctx: Context[Any]) -> Adjust:
    return ()


@dataclass(frozen=True)
class Handler(Generic[P]):
    #: the params model of its operation (``orchestrator.model.operation.PARAMS``)
    params: type[P]
    run: Callable[[Context[P]], Outcome]
    #: every lock it needs, by level (Ganeti's ``needed_locks``); the VM's lock is among them
    locks: Callable[[Context[P]], Declared] = vm_only
    #: whether the domain is still on this host afterwards, to record the fencing token in
    leaves_domain_here: bool = True
    #: a failed launch was rolled back by the driver: its name goes back too
    failure_deletes_vm: bool = False
    #: the reservations a failure gives back
    failure_adjust: Callable[[Context[P]], Adjust] = _nothing

    def context(self, job: Job, op: Operation, vm: Vm, driver: Driver, check: Callable[[], None], *,
                fence_token: int = 0, store: Store | None = None, blobs: Redis | None = None,
                move_max_mib: int = 4096) -> Context[P]:
        if not isinstance(op.params, self.params):
            raise TypeError(f"{op.op.value} takes {self.params.__name__}, not {type(op.params).__name__}")
        return Context(job, op, op.params, vm, driver, check, fence_token, store, blobs, move_max_mib)


def _state_update(result: DriverResult, *, fresh: bool = False, **more: Any) -> dict[str, Any]:
    """What a job writes on the VM record. A no-op's answer ("already running") is this job's
    result, not news about the VM: it leaves the VM's note (a change pending at next boot, say) as it was."""
    update = {"state": result.state.value, **more}
    if result.changed:
        update["note"] = result.note or ""
    if result.state in (VmState.SHUTOFF, VmState.CRASHED) or (fresh and result.changed):
        # off, or started afresh (a new QEMU process boots with what is set): no live value differs
        update.update(memory_mib_live="", vcpus_live="")
    return update


def _simple(method: Callable[[Driver, str], DriverResult], *, fresh: bool = False) -> Handler[NoParams]:
    """``fresh``: the operation starts a new QEMU process (start), which boots with what is set."""
    def run(ctx: Context[NoParams]) -> Outcome:
        ctx.check()
        result = method(ctx.driver, ctx.vm.domain)
        return Outcome(result, _state_update(result, fresh=fresh))

    return Handler(NoParams, run)


def _launch(ctx: Context[LaunchParams]) -> Outcome:
    """A catalog image is found in this host's store (never a path from the request); a VM made from
    one gets its cloud-init seed beside its disk before the domain is defined (``domxml`` attaches it)."""
    p = ctx.params
    image = seed = None
    if p.image is not None:
        assert ctx.store is not None
        image = images.catalog_image(ImageRecords(ctx.store.redis, ctx.store.scripts), ctx.driver.storage_dir,
                                     ctx.vm.host, p.image)
        if ctx.driver.status(ctx.vm.domain).state is VmState.MISSING:  # not a redelivered launch
            ctx.check()
            seed = cloudinit.build_seed(ctx.driver.seed_path(ctx.vm.domain), hostname=ctx.vm.name,
                                        instance_id=f"{ctx.vm.namespace}-{ctx.vm.name}-{ctx.job.id}",
                                        given_user_data=p.cloud_init, ssh_keys=p.ssh_keys)
    else:  # a VM without an image has no seed: none left by a crash may be attached to it
        ctx.driver.seed_path(ctx.vm.domain).unlink(missing_ok=True)
    assert ctx.store is not None
    spec = DomainSpec(namespace=ctx.vm.namespace, vm=ctx.vm.name, memory_mib=p.memory_mib, vcpus=p.vcpus,
                      disk_gib=p.disk_gib, image=str(image) if image else None, tags=dict(p.tags),
                      job_id=ctx.job.id, fence=ctx.fence_token,
                      nics=nichandlers.devices(NetworkRecords(ctx.store.redis), ctx.vm))
    ctx.check()
    try:
        with nichandlers.nics_up(ctx.vm):
            result = ctx.driver.launch(spec)
    except LockError:
        raise  # the lease is gone: touch nothing more
    except VmorchError:
        if seed is not None and ctx.driver.status(ctx.vm.domain).state is VmState.MISSING:
            seed.unlink(missing_ok=True)  # the driver undid the rest of this launch
        raise
    return Outcome(result, _state_update(result))


def _stop(ctx: Context[StopParams]) -> Outcome:
    ctx.check()
    p = ctx.params
    result = ctx.driver.stop(ctx.vm.domain, timeout_s=p.timeout_s, force=p.force, check=ctx.check,
                             force_after_timeout=p.force_after_timeout)
    nichandlers.released(ctx.vm)
    return Outcome(result, _state_update(result))


def _start(ctx: Context[NoParams]) -> Outcome:
    ctx.check()
    with nichandlers.nics_up(ctx.vm):
        result = ctx.driver.start(ctx.vm.domain)
    return Outcome(result, _state_update(result, fresh=True))


def _kill(ctx: Context[NoParams]) -> Outcome:
    ctx.check()
    result = ctx.driver.kill(ctx.vm.domain)
    nichandlers.released(ctx.vm)
    return Outcome(result, _state_update(result))


def _reboot(ctx: Context[RebootParams]) -> Outcome:
    ctx.check()
    result = ctx.driver.reboot(ctx.vm.domain, timeout_s=ctx.params.timeout_s, force=ctx.params.force,
                               check=ctx.check)
    # The VM's note stays: the same QEMU process runs on, so a change pending for the next boot still is.
    return Outcome(result, {"state": result.state.value})


def _delete(ctx: Context[NoParams]) -> Outcome:
    ctx.check()
    found = console.domain_console(ctx.driver, ctx.vm.domain)
    result = ctx.driver.delete(ctx.vm.domain)
    nichandlers.released(ctx.vm)
    ctx.driver.seed_path(ctx.vm.domain).unlink(missing_ok=True)  # its cloud-init seed, beside the disk
    if ctx.store is not None:  # its console output, input and log files go with it
        console.forget(ctx.store.redis, ctx.vm.namespace, ctx.vm.name, found[0] if found else None,
                       found[1] if found else domxml.console_log_path(ctx.driver.storage_dir, ctx.vm.domain))
    return Outcome(result, delete_vm=True)


def _exec(ctx: Context[ExecParams]) -> Outcome:
    return Outcome(execs.run_exec(ctx.driver, ctx.vm.domain, ctx.vm.name, ctx.params, attempts=ctx.job.attempts,
                                  check=ctx.check))


def _cp(ctx: Context[CpParams]) -> Outcome:
    return Outcome(execs.run_cp(ctx.driver, ctx.vm.domain, ctx.params, check=ctx.check))


def _set(ctx: Context[SetParams]) -> Outcome:
    ctx.check()
    nic_update: dict[str, Any] = {}
    if ctx.params.nic is not None:
        shaped, nic_update = nichandlers.set_nic(ctx.driver, ctx.vm, ctx.params)
        if ctx.params.memory_mib is None and ctx.params.vcpus is None:
            return Outcome(shaped, _state_update(shaped, **nic_update))
    result = ctx.driver.set_resources(ctx.vm.domain, memory_mib=ctx.params.memory_mib, vcpus=ctx.params.vcpus)
    # The record shows what is set (the persistent definition) and, where the running VM has something
    # else (read back from libvirt), that too; "" clears it.
    live: dict[str, Any] = {
        "memory_mib_live": result.memory_mib_live if result.memory_mib_live not in (None, result.memory_mib) else "",
        "vcpus_live": result.vcpus_live if result.vcpus_live not in (None, result.vcpus) else ""}
    return Outcome(result, _state_update(result, memory_mib=result.memory_mib, vcpus=result.vcpus, **live,
                                         **nic_update))


def _snapshot(ctx: Context[SnapshotParams]) -> Outcome:
    ctx.check()
    result = ctx.driver.snapshot(ctx.vm.domain, ctx.params.name, job_id=ctx.job.id)
    snapshots = ctx.driver.status(ctx.vm.domain).snapshots
    return Outcome(result, _state_update(result, snapshots=snapshots,
                                         snapshot_details=ctx.driver.snapshot_details(ctx.vm.domain)))


def _snapshot_delete(ctx: Context[SnapshotParams]) -> Outcome:
    ctx.check()
    result = ctx.driver.delete_snapshot(ctx.vm.domain, ctx.params.name)
    snapshots = ctx.driver.status(ctx.vm.domain).snapshots
    return Outcome(result, _state_update(result, snapshots=snapshots,
                                         snapshot_details=ctx.driver.snapshot_details(ctx.vm.domain)))


def _revert(ctx: Context[SnapshotParams]) -> Outcome:
    ctx.check()
    with nichandlers.nics_up(ctx.vm):
        result = ctx.driver.revert(ctx.vm.domain, ctx.params.name)
    # A revert restores the definition of the snapshot's time, memory and vCPUs included, and the
    # running guest of that time (what it has, read back, where it differs: "" clears it).
    return Outcome(result, _state_update(result, memory_mib=result.memory_mib, vcpus=result.vcpus,
                                         memory_mib_live=result.memory_mib_live or "",
                                         vcpus_live=result.vcpus_live or ""))


def _tag(ctx: Context[TagParams]) -> Outcome:
    p = ctx.params
    tags = {k: v for k, v in {**ctx.vm.tags, **p.set}.items() if k not in p.remove}
    ctx.check()
    ctx.driver.set_metadata(ctx.vm.domain, tags=tags)
    status = ctx.driver.status(ctx.vm.domain)
    return Outcome(Tagged(status.state, tags != ctx.vm.tags, tags=tags), {"tags": tags})


def _both_hosts(ctx: Context[Any], other: str) -> Declared:
    """A move's locks: the VM's, and both hosts' for the hand-over (their reservations change)."""
    return {**vm_only(ctx), Level.OTHER: [host_lock(ctx.job.host), host_lock(other)]}


def _move_out(ctx: Context[MoveOutParams]) -> Outcome:
    """On the source host: hand the definition and disk over through Redis, then forget the VM here."""
    p = ctx.params
    assert ctx.blobs is not None
    ctx.check()
    in_job = ctx.job.id + 1  # the move-in job: both were created in one atomic step
    # The reservations follow in the store (lua/finish.lua): the source gives back what the VM holds,
    # the target keeps what this move reserved there; a failed move-out gives that back (settle.lua).
    if p.live:
        assert ctx.store is not None
        target = ctx.store.host(p.to)
        source = ctx.store.host(ctx.vm.host)
        try:
            result = ctx.driver.migrate_live(ctx.vm.domain, target.migrate_uri,
                                             shared_storage=source.shared_storage and target.shared_storage)
        except VmGone:
            result = DriverResult(VmState.RUNNING, False)  # a re-run: it left already
        return Outcome(replace(result, note=f"live-migrated to {p.to}"),
                       {"host": p.to, "state": result.state.value, "note": f"moving live from {ctx.vm.host} to {p.to}"})
    try:
        xml, disk = ctx.driver.export(ctx.vm.domain)
    except VmGone:
        if not ctx.blobs.exists(keys.transfer(in_job)):
            raise
        size = 0  # a re-run after a crash between handing over and finishing: already done
    else:
        locks.require(*locks.declared_names(_both_hosts(ctx, p.to)))  # LOCK: vm, both hosts: the hand-over
        size = transfer.put(ctx.blobs, in_job, xml, disk, max_mib=ctx.move_max_mib)
        ctx.check()
        ctx.driver.delete(ctx.vm.domain)
        ctx.driver.seed_path(ctx.vm.domain).unlink(missing_ok=True)  # it went along in the definition
        log_file = domxml.console_of(xml)[0]  # its console stream moves on with it; the log here goes
        if log_file:
            console.rotated(Path(log_file)).unlink(missing_ok=True)
            Path(log_file).unlink(missing_ok=True)
    return Outcome(HandedOver(VmState.SHUTOFF, True, f"handed over to {p.to}", bytes=size),
                   {"host": p.to, "state": VmState.SHUTOFF.value, "note": f"moving from {ctx.vm.host} to {p.to}"})


def _move_in(ctx: Context[MoveInParams]) -> Outcome:
    """On the target host: define the VM from what the move-out handed over."""
    p = ctx.params
    assert ctx.store is not None and ctx.blobs is not None
    out = ctx.store.get_job(ctx.job.id - 1)
    if out.op is not Op.MOVE_OUT or out.vm != ctx.job.vm or out.state is not JobState.SUCCEEDED:
        raise ExecError(f"nothing to import: the move-out (job {out.id}) {out.state.value}",
                        hint=f"the VM stays on {p.source}")
    ctx.check()
    here = ctx.driver.status(ctx.vm.domain).state
    if here is VmState.MISSING:
        moved_out = operation_of(out).params
        if isinstance(moved_out, MoveOutParams) and moved_out.live:
            raise ExecError(f"{ctx.vm.domain} did not arrive on this host", hint="see the move-out job's result")
        disk = ctx.driver.disk_path(ctx.vm.domain)
        xml, has_disk = transfer.get(ctx.blobs, ctx.job.id, disk)
        # this host's accelerator (kvm or qemu) and its place for the console log
        xml = domxml.localize(xml, virt_type=ctx.driver.virt_type,
                              console_log=str(domxml.console_log_path(ctx.driver.storage_dir, ctx.vm.domain)))
        result = ctx.driver.import_domain(ctx.vm.domain, xml, disk if has_disk else None)
    else:
        result = DriverResult(here, False)  # a re-run: it arrived already
    locks.require(*locks.declared_names(_both_hosts(ctx, p.source)))  # LOCK: vm, both hosts: the hand-over
    transfer.drop(ctx.blobs, ctx.job.id)
    return Outcome(replace(result, note=f"moved from {p.source}"),
                   {"state": result.state.value, "note": f"moved from {p.source}"})


HANDLERS: dict[Op, Handler[Any]] = {
    Op.LAUNCH: Handler(LaunchParams, _launch, failure_deletes_vm=True),
    Op.START: Handler(NoParams, _start),
    Op.STOP: Handler(StopParams, _stop),
    Op.KILL: Handler(NoParams, _kill),
    Op.PAUSE: _simple(Driver.pause),
    Op.RESUME: _simple(Driver.resume),
    Op.REBOOT: Handler(RebootParams, _reboot),
    Op.DELETE: Handler(NoParams, _delete, leaves_domain_here=False),
    Op.SET: Handler(SetParams, _set),
    Op.SNAPSHOT: Handler(SnapshotParams, _snapshot),
    Op.REVERT: Handler(SnapshotParams, _revert),
    Op.SNAPSHOT_DELETE: Handler(SnapshotParams, _snapshot_delete),
    Op.TAG: Handler(TagParams, _tag),
    Op.MOVE_OUT: Handler(MoveOutParams, _move_out, lambda ctx: _both_hosts(ctx, ctx.params.to),
                         leaves_domain_here=False),
    Op.MOVE_IN: Handler(MoveInParams, _move_in, lambda ctx: _both_hosts(ctx, ctx.params.source)),
    Op.EXEC: Handler(ExecParams, _exec),
    Op.CP: Handler(CpParams, _cp),
}
