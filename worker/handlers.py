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

from orchestrator.locks import LockName
from orchestrator.operation import LaunchParams, Op, SetParams, SnapshotParams, StopParams, TagParams
from orchestrator.records import Job, Vm

from .driver import DomainSpec, Driver


@dataclass(frozen=True)
class Outcome:
    result: dict[str, Any]
    vm_update: Mapping[str, Any] | None = None
    delete_vm: bool = False


@dataclass
class Context:
    job: Job
    vm: Vm
    driver: Driver
    #: raises LockLost / Canceled; call before every side effect
    check: Callable[[], None]
    fence_token: int = 0


@dataclass(frozen=True)
class Handler:
    run: Callable[[Context], Outcome]
    #: locks this operation needs besides the VM's (all of level ``other``: the VM's is held)
    extra_locks: Callable[[Job], tuple[LockName, ...]] = field(default=lambda job: ())


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


HANDLERS: dict[Op, Handler] = {
    Op.LAUNCH: Handler(_launch),
    Op.START: _simple(Driver.start),
    Op.STOP: Handler(_stop),
    Op.KILL: _simple(Driver.kill),
    Op.PAUSE: _simple(Driver.pause),
    Op.RESUME: _simple(Driver.resume),
    Op.REBOOT: _simple(Driver.reboot),
    Op.DELETE: Handler(_delete),
    Op.SET: Handler(_set),
    Op.SNAPSHOT: Handler(_snapshot),
    Op.REVERT: Handler(_revert),
    Op.TAG: Handler(_tag),
}

