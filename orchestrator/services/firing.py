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


def fire(client: RedisClient, namespace: str, name: str, *, by: str = "") -> Firing | None:
    """One firing: claim the slot under the schedule's lock, create the jobs with no lock held, record them."""
    store = ScheduleStore(client)
    now = client.store.redis_time()
    with store.locked(namespace, name):
        claimed = store.claim(namespace, name, now)  # LOCK: schedule
    if claimed is None:
        return None
    h, slot, skip = claimed
    firing = Firing(slot=datetime.fromtimestamp(slot, UTC), fired_at=datetime.fromtimestamp(now, UTC),
                    state="skipped" if skip else "fired", by=by)
    if not skip:
        try:
            ops = operations(h)
            if ops is None:
                text = json.loads(h["target"])["experiment"]
                run = client.run_experiment(text, namespace=namespace, source=f"schedule:{name}")
                firing = firing.model_copy(update={"run": run.id, "jobs": [s.job for s in run.steps]})
            else:
                firing = firing.model_copy(update={"jobs": submit(client, namespace, ops)})
        except VmorchError as exc:
            firing = firing.model_copy(update={"state": "failed", "error": f"{exc.code}: {exc.message}"})
    with store.locked(namespace, name):
        store.record(namespace, name, firing)  # LOCK: schedule
    return firing


def submit(client: RedisClient, namespace: str, requests: list[TargetedOp]) -> list[int]:
    """Submit a schedule's operations as ``vmorch vm OP TARGET`` does, all as one batch (all or none);
    returns the ids of the parent job, if any, then of the jobs."""
    ops: list[Operation] = []
    for r in requests:
        ops += r.operations(namespace, targets.resolve(client, namespace, r.target, r.tag))
    label = "; ".join(r.label for r in requests)
    jobs = client.submit(ops, SubmitOptions(label=label[:200]))
    parents = sorted({j.parent for j in jobs if j.parent is not None})
    return parents + [j.id for j in jobs]
