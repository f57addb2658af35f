"""A schedule's firing, run by the scheduler process (``orchestrator.services.scheduler``)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

from orchestrator.model.errors import VmorchError
from orchestrator.services.client import RedisClient
from orchestrator.services.schedules import Firing, ScheduleStore, lock


def fire(client: RedisClient, namespace: str, name: str, *, by: str = "") -> Firing | None:
    """One firing: claim the slot under the schedule's lock, create the jobs with no lock held, record them."""
    store = ScheduleStore(client)
    now = client.store.redis_time()
    timeout = client.settings.submit_lock_timeout
    with client.locks.hold(lock(namespace, name), timeout=timeout):
        claimed = store.claim(namespace, name, now)  # LOCK: schedule
    if claimed is None:
        return None
    h, slot, skip = claimed
    firing = Firing(slot=datetime.fromtimestamp(slot, UTC), fired_at=datetime.fromtimestamp(now, UTC),
                    state="skipped" if skip else "fired", by=by)
    if not skip:
        target = json.loads(h["target"])
        try:
            if "experiment" in target:
                run = client.run_experiment(target["experiment"], namespace=namespace, source=f"schedule:{name}")
                firing = firing.model_copy(update={"run": run.id, "jobs": [s.job for s in run.steps]})
            else:
                firing = firing.model_copy(update={"jobs": run_command(client, namespace, target["command"])})
        except VmorchError as exc:
            firing = firing.model_copy(update={"state": "failed", "error": f"{exc.code}: {exc.message}"})
    with client.locks.hold(lock(namespace, name), timeout=timeout):
        store.record(namespace, name, firing)  # LOCK: schedule
    return firing


def run_command(client: RedisClient, namespace: str, command: list[str]) -> list[int]:
    """Run a vm command exactly as a user would (the ``vmorch`` CLI); the ids of the jobs it made."""
    argv = [sys.executable, "-m", "cli", "--json", "--redis-url", client.url, "--namespace", namespace, *command]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    try:
        out = json.loads(proc.stdout or "null")
    except ValueError:
        out = None
    if proc.returncode != 0 or out is None:
        reason = (out or {}).get("error", {}).get("message") if isinstance(out, dict) else None
        raise VmorchError(reason or (proc.stderr.strip().splitlines() or ["no output"])[-1])
    jobs = out if isinstance(out, list) else [out]
    ids = [int(j["id"]) for j in jobs]
    parents = sorted({int(j["parent"]) for j in jobs if j.get("parent")})
    return parents + ids
