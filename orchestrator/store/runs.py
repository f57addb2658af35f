"""Experiment runs as they are recorded in Redis: which parent job each step of a run is."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal, cast

from pydantic import BaseModel, Field
from redis import Redis

from orchestrator.model.errors import NotFound
from orchestrator.model.records import Job, JobState, _Record, ts
from orchestrator.store import keys


class RunStep(BaseModel):
    name: str
    kind: Literal["launch", "step", "teardown"]
    #: the step's parent job (one child per VM)
    job: int
    #: the steps it waits for (names)
    after: list[str] = Field(default_factory=list)


class ExperimentRun(_Record):
    id: int
    name: str
    namespace: str
    #: where the file came from (a path, or ``schedule:<name>``)
    source: str
    started_at: datetime | None
    by: str
    steps: list[RunStep]
    #: running while a step is not final; then failed if one failed, canceled if one was, else succeeded
    state: JobState
    #: each step's parent job, by step name (filled by ``RedisClient.experiment_run``)
    jobs: dict[str, Job] = Field(default_factory=dict)


def derive_state(jobs: list[Job]) -> JobState:
    if any(not j.state.final for j in jobs):
        return JobState.RUNNING
    for state in (JobState.FAILED, JobState.CANCELED):
        if any(j.state is state for j in jobs):
            return state
    return JobState.SUCCEEDED


class RunStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def save(self, *, name: str, namespace: str, source: str, text: str, by: str, steps: list[RunStep],
             idempotency_key: str | None = None) -> int:
        """Record a run; with ``idempotency_key``, a second save with the key records nothing and
        returns the first's id (its steps' jobs are the same: their submits had keys too)."""
        run_id = int(self.redis.incr(keys.RUN_NEXT))
        sec, usec = self.redis.time()
        pipe = self.redis.pipeline()
        pipe.hset(keys.run(run_id), mapping={
            "id": run_id, "name": name, "namespace": namespace, "source": source, "text": text, "by": by,
            "started_at": f"{sec + usec / 1e6:.6f}", "steps": json.dumps([s.model_dump() for s in steps])})
        pipe.zadd(keys.runs(namespace), {str(run_id): run_id})
        pipe.execute()
        if idempotency_key is not None:
            # After the record: a saver that dies in between leaves a run nobody repeats, never a
            # key that names a run that was not written.
            idem = keys.idempotency(idempotency_key)
            if not self.redis.set(idem, json.dumps([run_id]), nx=True, ex=keys.IDEMPOTENCY_TTL):
                self.redis.delete(keys.run(run_id))
                self.redis.zrem(keys.runs(namespace), str(run_id))
                return int(json.loads(self.redis.get(idem) or "[0]")[0])
        return run_id

    def get(self, run_id: int) -> ExperimentRun:
        h = cast(dict[str, str], self.redis.hgetall(keys.run(run_id)))
        if not h:
            raise NotFound(f"no experiment run {run_id}", hint="list runs with 'vmorch experiment list'")
        return ExperimentRun(id=int(h["id"]), name=h["name"], namespace=h["namespace"], source=h["source"],
                             started_at=ts(h.get("started_at")), by=h.get("by", ""),
                             steps=[RunStep(**s) for s in json.loads(h["steps"])], state=JobState.RUNNING)

    def ids(self, namespace: str, limit: int) -> list[int]:
        return [int(i) for i in cast(list[str], self.redis.zrevrange(keys.runs(namespace), 0, limit - 1))]
