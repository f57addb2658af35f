"""Host reservations follow what each VM holds: for memory and vCPUs each, the larger of what is set
and what its running guest has (``lua/reserve.lua``). Driven through the store's own calls (the
scripts a worker's and a submitter's steps run) against the real Redis fixture: a resize either way,
a VM found off, a delete, and moves that happen, fail, are canceled, never get sent, or follow a
resize accepted before them.

What placement counts on a host is its record's ``committed_mib`` and ``committed_vcpus``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis

from orchestrator.model.operation import Op, Operation
from orchestrator.model.records import Job, JobState
from orchestrator.store import keys
from orchestrator.store.jobstore import BatchEntry, Store, Submitted

from .test_scripts import fence


@pytest.fixture
def store(redis: Redis, ns: str) -> Iterator[Store]:
    yield Store(redis)
    ids = [int(str(i)) for i in redis.zrange(keys.jobs(ns), 0, -1)]
    for i in ids:
        redis.delete(keys.job(i), keys.job_children(i), keys.job_dependents(i), keys.job_history(i))
    if ids:
        redis.zrem(keys.RELEASED, *ids)
        redis.zrem(keys.DELAYED, *ids)
    for key in redis.scan_iter(f"*{ns}*"):  # the hosts are named after the namespace too
        redis.delete(key)
    redis.srem(keys.NAMESPACES, ns)


def held(redis: Redis, host: str) -> tuple[int, int]:
    mib, vcpus = redis.hmget(keys.host(host), "committed_mib", "committed_vcpus")
    return int(mib or 0), int(vcpus or 0)


def accept(store: Store, op: Operation, **entry: Any) -> list[Submitted]:
    return store.submit_batch([BatchEntry(op, **entry)])[1]


def done(store: Store, redis: Redis, job: Job, state: JobState = JobState.SUCCEEDED, *,
         update: dict[str, Any] | None = None, delete: bool = False) -> None:
    """A job's end as the worker writes it, under the VM's lock (its fence)."""
    f = fence(redis, job.namespace, job.vm)
    assert store.finish(job, f, state, vm_update=update, delete_vm=delete, by="test").done


def resized(store: Store, redis: Redis, ns: str, memory: int, vcpus: int, *, live: tuple[int | str, int | str],
            state: str = "running") -> None:
    """A ``vm set`` job, finished with what ``worker.handlers._set`` writes: what is set, and what the
    running guest has where it differs ("" where the same)."""
    [s] = accept(store, Operation.build(Op.SET, ns, "a", memory_mib=memory, vcpus=vcpus))
    done(store, redis, s.job, update={"state": state, "memory_mib": memory, "vcpus": vcpus,
                                      "memory_mib_live": live[0], "vcpus_live": live[1]})


def launched(store: Store, redis: Redis, ns: str, host: str) -> None:
    [a] = accept(store, Operation.build(Op.LAUNCH, ns, "a", memory_mib=256, vcpus=2), host=host)
    assert held(redis, host) == (256, 2)
    done(store, redis, a.job, update={"state": "running"})


def move(store: Store, ns: str, source: str, target: str, *, live: bool = False) -> tuple[Job, Job]:
    out, into = accept(store, Operation.build(Op.MOVE_OUT, ns, "a", to=target, live=live), host=target, source=source)
    return out.job, into.job


def test_a_resize_reserves_the_larger_of_set_and_live_both_ways(store: Store, redis: Redis, ns: str) -> None:
    h = f"h-{ns}"
    launched(store, redis, ns, h)
    # set above what the running guest has taken yet: the host reserves what is set, at once
    resized(store, redis, ns, 512, 2, live=(256, ""))
    assert held(redis, h) == (512, 2)
    # set below what the guest keeps (its balloon ignored it; a vCPU it won't unplug): what it has stays reserved
    resized(store, redis, ns, 128, 1, live=(512, 2))
    assert held(redis, h) == (512, 2)
    vm = store.get_vm(ns, "a", as_stored=True)
    assert (vm.memory_mib, vm.memory_mib_live, vm.vcpus, vm.vcpus_live) == (128, 512, 1, 2)
    # the guest gave the memory back (read back by a later set): only the vCPU still holds more than set
    resized(store, redis, ns, 128, 1, live=("", 2))
    assert held(redis, h) == (128, 2)
    # found off by reconciliation: nothing runs, so nothing live is held (and the record says so)
    store.update_vm(ns, "a", fence(redis, ns, "a"), {"state": "shutoff"}, by="sync")
    assert held(redis, h) == (128, 1)
    vm = store.get_vm(ns, "a", as_stored=True)
    assert (vm.memory_mib_live, vm.vcpus_live) == (None, None)
    # a correction of what is set, by reconciliation, moves it the same way
    store.update_vm(ns, "a", fence(redis, ns, "a"), {"memory_mib": 192}, by="sync")
    assert held(redis, h) == (192, 1)
    resized(store, redis, ns, 64, 1, live=(192, ""))
    [gone] = accept(store, Operation.build(Op.DELETE, ns, "a"))
    done(store, redis, gone.job, delete=True)
    assert held(redis, h) == (0, 0)  # a delete gives back what it held (192), not what was set (64)


def test_a_move_hands_what_the_vm_holds_to_its_target(store: Store, redis: Redis, ns: str) -> None:
    src, dst = f"h-{ns}", f"h2-{ns}"
    launched(store, redis, ns, src)
    resized(store, redis, ns, 256, 2, live=(384, 3))  # the running guest has more than is set
    assert held(redis, src) == (384, 3)
    out, into = move(store, ns, src, dst, live=True)
    assert held(redis, dst) == (384, 3) and held(redis, src) == (384, 3)  # reserved there at acceptance
    done(store, redis, out, update={"host": dst, "state": "running"})  # migrated live: the guest runs on
    assert held(redis, src) == (0, 0) and held(redis, dst) == (384, 3)
    done(store, redis, into, update={"state": "running"})
    assert held(redis, dst) == (384, 3)
    # a cold move: the guest is off when it leaves, so the target keeps only what is set
    out, into = move(store, ns, dst, src)
    assert held(redis, src) == (384, 3)
    done(store, redis, out, update={"host": src, "state": "shutoff"})
    assert held(redis, dst) == (0, 0) and held(redis, src) == (256, 2)
    done(store, redis, into, update={"state": "shutoff"})
    [gone] = accept(store, Operation.build(Op.DELETE, ns, "a"))
    done(store, redis, gone.job, delete=True)
    assert held(redis, src) == (0, 0) and held(redis, dst) == (0, 0)


def test_a_move_that_does_not_happen_gives_its_room_back(store: Store, redis: Redis, ns: str) -> None:
    src, dst = f"h-{ns}", f"h2-{ns}"
    launched(store, redis, ns, src)
    resized(store, redis, ns, 256, 2, live=(320, ""))
    # the move-out fails (the VM stays where it is)
    out, into = move(store, ns, src, dst, live=True)
    assert held(redis, dst) == (320, 2)
    done(store, redis, out, JobState.FAILED, update={"state": "running"})
    done(store, redis, into, JobState.FAILED)
    assert held(redis, dst) == (0, 0) and held(redis, src) == (320, 2)
    # canceled before it ran
    out, into = move(store, ns, src, dst, live=True)
    assert store.cancel(out.id, "test")[0] == "canceled" and store.cancel(into.id, "test")[0] == "canceled"
    assert held(redis, dst) == (0, 0)
    # accepted, but its wake-up could not be sent
    accepted = store.submit_batch([BatchEntry(Operation.build(Op.MOVE_OUT, ns, "a", to=dst, live=True),
                                              host=dst, source=src)])[1]
    for submitted in accepted:
        store.fail_unsent(submitted, "broker gone")
    assert held(redis, dst) == (0, 0) and held(redis, src) == (320, 2)


def test_the_target_ends_up_holding_what_the_vm_holds_when_it_moves(store: Store, redis: Redis, ns: str) -> None:
    """A resize accepted before the move runs first: the target reserved what the VM held at the
    move's acceptance, and holds what it holds once it moved."""
    src, dst = f"h-{ns}", f"h2-{ns}"
    launched(store, redis, ns, src)
    store.update_vm(ns, "a", fence(redis, ns, "a"), {"state": "shutoff"}, by="sync")
    [grow] = accept(store, Operation.build(Op.SET, ns, "a", memory_mib=384, vcpus=3))
    out, into = move(store, ns, src, dst)
    assert held(redis, dst) == (256, 2)
    done(store, redis, grow.job, update={"state": "shutoff", "memory_mib": 384, "vcpus": 3})
    assert held(redis, src) == (384, 3)
    done(store, redis, out, update={"host": dst, "state": "shutoff"})
    assert held(redis, src) == (0, 0) and held(redis, dst) == (384, 3)
    done(store, redis, into, update={"state": "shutoff"})
    [gone] = accept(store, Operation.build(Op.DELETE, ns, "a"))
    done(store, redis, gone.job, delete=True)
    assert held(redis, dst) == (0, 0)
