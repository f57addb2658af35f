"""A schedule's firing, run by the scheduler process (``orchestrator.services.scheduler``).

The jobs are made in this process, through the same submit path as the CLI (``client.submit``):
no command line is run, so no Redis URL or password is ever on one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from orchestrator.control import targets
from orchestrator.model.errors import VmorchError
from orchestrator.model.operation import Operation, SubmitOptions, TargetedOp
from orchestrator.services.client import RedisClient
from orchestrator.services.schedules import Firing, ScheduleStore, operations


def fire(client: RedisClient, namespace: str, name: str, *, by: str = "", now: float | None = None) -> Firing | None:
    """One firing, once per slot, however often it runs.

    The slot is looked up under the schedule's lock but not claimed; the jobs are made with no lock
    held (submitting takes the higher ``cmd`` locks), under an idempotency key made of the slot, so
    another firing of the same slot (an overlapping scheduler, or this firing redelivered after its
    scheduler died mid-way) gets the same jobs back and makes none; last, under the lock, the slot
    is claimed and the firing recorded, by the first to get there. So a slot's jobs are created and
    claimed as one: a scheduler that dies before submitting leaves the slot to the redelivered firing,
    and one that dies after leaves jobs that the redelivered firing finds and records.
    """
    store = ScheduleStore(client)
    now = client.store.redis_time() if now is None else now
    with store.locked(namespace, name):
        due = store.due(namespace, name, now)  # LOCK: schedule
    if due is None:
        return None
    h, slot, skip = due
    firing = Firing(slot=datetime.fromtimestamp(slot, UTC), fired_at=datetime.fromtimestamp(now, UTC),
                    state="skipped" if skip else "fired", by=by)
    if not skip:
        key = f"schedule/{namespace}/{name}/{slot:.6f}"
        try:
            ops = operations(h)
            if ops is None:
                text = json.loads(h["target"])["experiment"]
                run = client.run_experiment(text, namespace=namespace, source=f"schedule:{name}", idempotency_key=key)
                firing = firing.model_copy(update={"run": run.id, "jobs": [s.job for s in run.steps]})
            else:
                firing = firing.model_copy(update={"jobs": submit(client, namespace, ops, idempotency_key=key)})
        except VmorchError as exc:
            firing = firing.model_copy(update={"state": "failed", "error": f"{exc.code}: {exc.message}"})
    with store.locked(namespace, name):
        if not store.claim(namespace, name, slot):  # LOCK: schedule
            return None  # another firing of this slot recorded it (with these same jobs)
        store.record(namespace, name, firing)  # LOCK: schedule
    return firing


def submit(client: RedisClient, namespace: str, requests: list[TargetedOp], *,
           idempotency_key: str | None = None) -> list[int]:
    """Submit a schedule's operations as ``vmorch vm OP TARGET`` does, all as one batch (all or none);
    returns the ids of the parent job, if any, then of the jobs."""
    ops: list[Operation] = []
    for r in requests:
        ops += r.operations(namespace, targets.resolve(client, namespace, r.target, r.tag))
    label = "; ".join(r.label for r in requests)
    jobs = client.submit(ops, SubmitOptions(label=label[:200], idempotency_key=idempotency_key))
    parents = sorted({j.parent for j in jobs if j.parent is not None})
    return parents + [j.id for j in jobs]
