"""One handler per operation, and the dispatch table (a test asserts it is complete).

A handler runs with the VM's lock held (``# LOCK: vm:<ns>:<vm>``) and calls
``ctx.check()`` before every side effect, so a lost lock or a cancel request stops it
before it touches libvirt again. It returns an ``Outcome``: the job's result and what
changes in the VM record. The runner writes both in one fenced step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from orchestrator.control.locks import LockName, host_lock
from orchestrator.model.errors import ExecError, VmGone
from orchestrator.model.operation import (
    LaunchParams,
    MoveInParams,
    MoveOutParams,
    Op,
    SetParams,
    SnapshotParams,
    StopParams,
    TagParams,
)
from orchestrator.model.records import Job, JobState, Vm, VmState
from orchestrator.store import keys, transfer
from orchestrator.store.jobstore import Store

from .driver import DomainSpec, Driver


@dataclass(frozen=True)
class Outcome:
    result: dict[str, Any]
    vm_update: Mapping[str, Any] | None = None
    delete_vm: bool = False
    #: reservations to change: (host, MiB, vCPUs)
    adjust: tuple[tuple[str, int, int], ...] = ()


@dataclass
class Context:
    job: Job
    vm: Vm
    driver: Driver
    #: raises LockLost / Canceled; call before every side effect
    check: Callable[[], None]
    fence_token: int = 0
    store: Store | None = None
    #: a bytes client, for the disk chunks of a move
    blobs: Redis | None = None
    move_max_mib: int = 4096


@dataclass(frozen=True)
class Handler:
    run: Callable[[Context], Outcome]
    #: locks this operation needs besides the VM's (all of level ``other``: the VM's is held)
    extra_locks: Callable[[Job], tuple[LockName, ...]] = field(default=lambda job: ())
    #: whether the domain is still on this host afterwards, to record the fencing token in
    leaves_domain_here: bool = True


def _state_update(result: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    return {"state": result["state"], "note": result.get("note", ""), **more}


def _simple(method: Callable[[Driver, str], dict[str, Any]]) -> Handler:
    def run(ctx: Context) -> Outcome:
        ctx.check()
        result = method(ctx.driver, ctx.vm.domain)
        return Outcome(result, _state_update(result))

    return Handler(run)


def _launch(ctx: Context) -> Outcome:
    p = LaunchParams.model_validate(ctx.job.params)
    spec = DomainSpec(namespace=ctx.vm.namespace, vm=ctx.vm.name, memory_mib=p.memory_mib, vcpus=p.vcpus,
                      disk_gib=p.disk_gib, image=p.image, tags=dict(p.tags), job_id=ctx.job.id,
                      fence=ctx.fence_token)
    ctx.check()
    result = ctx.driver.launch(spec)
    return Outcome(result, _state_update(result))


def _stop(ctx: Context) -> Outcome:
    p = StopParams.model_validate(ctx.job.params)
    ctx.check()
    result = ctx.driver.stop(ctx.vm.domain, timeout_s=p.timeout_s, force=p.force, check=ctx.check)
    return Outcome(result, _state_update(result))


def _delete(ctx: Context) -> Outcome:
    ctx.check()
    result = ctx.driver.delete(ctx.vm.domain)
    return Outcome(result, delete_vm=True)


def _set(ctx: Context) -> Outcome:
    p = SetParams.model_validate(ctx.job.params)
    ctx.check()
    result = ctx.driver.set_resources(ctx.vm.domain, memory_mib=p.memory_mib, vcpus=p.vcpus)
    # The record shows what was set (the persistent definition), not what a guest ballooned to.
    return Outcome(result, _state_update(result, memory_mib=result["memory_mib"], vcpus=result["vcpus"]))


def _snapshot(ctx: Context) -> Outcome:
    p = SnapshotParams.model_validate(ctx.job.params)
    ctx.check()
    result = ctx.driver.snapshot(ctx.vm.domain, p.name, job_id=ctx.job.id)
    snapshots = ctx.driver.status(ctx.vm.domain).snapshots
    return Outcome(result, _state_update(result, snapshots=snapshots))


def _revert(ctx: Context) -> Outcome:
    p = SnapshotParams.model_validate(ctx.job.params)
    ctx.check()
    result = ctx.driver.revert(ctx.vm.domain, p.name)
    # A revert restores the definition of the snapshot's time, memory and vCPUs included.
    return Outcome(result, _state_update(result, memory_mib=result["memory_mib"], vcpus=result["vcpus"]))


def _tag(ctx: Context) -> Outcome:
    p = TagParams.model_validate(ctx.job.params)
    tags = {k: v for k, v in {**ctx.vm.tags, **p.set}.items() if k not in p.remove}
    ctx.check()
    ctx.driver.set_metadata(ctx.vm.domain, tags=tags)
    status = ctx.driver.status(ctx.vm.domain)
    changed = tags != ctx.vm.tags
    return Outcome({"state": status.state.value, "changed": changed, "tags": tags}, {"tags": tags})


def _move_out(ctx: Context) -> Outcome:
    """On the source host: hand the definition and disk over through Redis, then forget the VM here."""
    p = MoveOutParams.model_validate(ctx.job.params)
    assert ctx.blobs is not None
    ctx.check()
    in_job = ctx.job.id + 1  # the move-in job: both were created in one atomic step
    if p.live:
        assert ctx.store is not None
        target = ctx.store.host(p.to)
        source = ctx.store.host(ctx.vm.host)
        try:
            result = ctx.driver.migrate_live(ctx.vm.domain, target.migrate_uri,
                                             shared_storage=source.shared_storage and target.shared_storage)
        except VmGone:
            result = {"state": VmState.RUNNING.value, "changed": False}  # a re-run: it left already
        return Outcome({**result, "note": f"live-migrated to {p.to}"},
                       {"host": p.to, "state": result["state"], "note": f"moving live from {ctx.vm.host} to {p.to}"},
                       adjust=((ctx.vm.host, -ctx.vm.memory_mib, -ctx.vm.vcpus),))
    try:
        xml, disk = ctx.driver.export(ctx.vm.domain)
    except VmGone:
        if not ctx.blobs.exists(keys.transfer(in_job)):
            raise
        size = 0  # a re-run after a crash between handing over and finishing: already done
    else:
        size = transfer.put(ctx.blobs, in_job, xml, disk, max_mib=ctx.move_max_mib)
        ctx.check()
        ctx.driver.delete(ctx.vm.domain)
    return Outcome({"state": VmState.SHUTOFF.value, "changed": True, "bytes": size, "note": f"handed over to {p.to}"},
                   {"host": p.to, "state": VmState.SHUTOFF.value, "note": f"moving from {ctx.vm.host} to {p.to}"},
                   adjust=((ctx.vm.host, -ctx.vm.memory_mib, -ctx.vm.vcpus),))


def _move_in(ctx: Context) -> Outcome:
    """On the target host: define the VM from what the move-out handed over."""
    p = MoveInParams.model_validate(ctx.job.params)
    assert ctx.store is not None and ctx.blobs is not None
    out = ctx.store.get_job(ctx.job.id - 1)
    if out.op is not Op.MOVE_OUT or out.vm != ctx.job.vm or out.state is not JobState.SUCCEEDED:
        raise ExecError(f"nothing to import: the move-out (job {out.id}) {out.state.value}",
                        hint=f"the VM stays on {p.source}")
    ctx.check()
    here = ctx.driver.status(ctx.vm.domain).state
    if here is VmState.MISSING:
        if MoveOutParams.model_validate(out.params).live:
            raise ExecError(f"{ctx.vm.domain} did not arrive on this host", hint="see the move-out job's result")
        disk = ctx.driver.disk_path(ctx.vm.domain)
        xml, has_disk = transfer.get(ctx.blobs, ctx.job.id, disk)
        result = ctx.driver.import_domain(ctx.vm.domain, xml, disk if has_disk else None)
    else:
        result = {"state": here.value, "changed": False}  # a re-run: it arrived already
    transfer.drop(ctx.blobs, ctx.job.id)
    return Outcome({**result, "note": f"moved from {p.source}"},
                   {"state": result["state"], "note": f"moved from {p.source}"})


def failure_adjust(job: Job, vm: Vm) -> tuple[tuple[str, int, int], ...]:
    """Reservations a failed job gives back: a move-out that failed frees the room held on its target."""
    if job.op is Op.MOVE_OUT:
        return ((MoveOutParams.model_validate(job.params).to, -vm.memory_mib, -vm.vcpus),)
    return ()


HANDLERS: dict[Op, Handler] = {
    Op.LAUNCH: Handler(_launch),
    Op.START: _simple(Driver.start),
    Op.STOP: Handler(_stop),
    Op.KILL: _simple(Driver.kill),
    Op.PAUSE: _simple(Driver.pause),
    Op.RESUME: _simple(Driver.resume),
    Op.REBOOT: _simple(Driver.reboot),
    Op.DELETE: Handler(_delete, leaves_domain_here=False),
    Op.SET: Handler(_set),
    Op.SNAPSHOT: Handler(_snapshot),
    Op.REVERT: Handler(_revert),
    Op.TAG: Handler(_tag),
    # both host locks, in the hierarchy's order, for the hand-over (the VM's lock is held already)
    Op.MOVE_OUT: Handler(_move_out, lambda job: tuple(sorted(
        {host_lock(job.host), host_lock(MoveOutParams.model_validate(job.params).to)})), leaves_domain_here=False),
    Op.MOVE_IN: Handler(_move_in, lambda job: tuple(sorted(
        {host_lock(job.host), host_lock(MoveInParams.model_validate(job.params).source)}))),
}

