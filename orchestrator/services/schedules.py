"""Schedules: an experiment or operations run by cron, every N, or once at a time.

What a schedule runs is stored as data, never as a command line: either an experiment file's
text, or operations (``TargetedOp``: op, target, tags and the op's typed params, as ``vmorch vm
OP TARGET`` makes them). A firing resolves their VMs and submits their jobs in the scheduler's
own process, through the same submit path as the CLI (``client.submit``).

A schedule is ours in Redis (``P:schedule:<ns>:<name>``: what, when, history) plus its
celery-redbeat entry (``P:redbeat:<ns>/<name>``), which celery beat (``vmorch scheduler``)
reads to know when to fire. RedBeat's lock makes one scheduler active cluster-wide; a standby
takes over within ``scheduler_lock_timeout`` of the active one dying.

A firing is a Celery task on ``vmorch.schedules``, run by a scheduler process (``firing.fire``): it
finds the *slot* (the scheduled time it stands for), creates the jobs with no lock held (submitting
takes the higher ``cmd`` locks) under an idempotency key made of the slot, then, under the lock
``schedule:<ns>:<name>``, marks the slot fired and records it. A second firing of the slot (an
overlapping scheduler, or a firing delivered again after its scheduler died) finds the same jobs
and records nothing: each slot's jobs exist once.

Missed slots (no scheduler running at the time): RedBeat fires a late entry once, not once per
missed slot. ``missed="once"`` (default) runs that late firing; ``missed="skip"`` drops a firing
more than ``GRACE`` seconds after its slot and waits for the next one.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.control import locks
from orchestrator.control.locks import Holding, LockName, other_lock
from orchestrator.model import experiment
from orchestrator.model.errors import AlreadyExists, InvalidInput, NotFound
from orchestrator.model.names import Name, Namespace
from orchestrator.model.operation import TargetedOp
from orchestrator.model.records import _Record, ts
from orchestrator.store import keys

if TYPE_CHECKING:
    from celery import Celery

    from orchestrator.control.connection import Connection
    from orchestrator.model.settings import Settings

FIRE_TASK = "vmorch.fire_schedule"
#: seconds after which a firing not acknowledged (its scheduler died) is delivered again
FIRING_REDELIVERY_S = 60
#: seconds after its slot past which a ``missed="skip"`` firing is dropped
GRACE = 60.0
HISTORY = 100
#: operations one schedule may run
MAX_OPERATIONS = 100


def every_seconds(value: str) -> int:
    try:
        return experiment.duration_seconds(value)
    except InvalidInput:
        raise InvalidInput(f"bad interval {value!r}",
                           hint="write --every as a number and a unit: 30s, 10m, 1h, 1d") from None


class ScheduleSpec(BaseModel):
    """What ``schedule add`` asks for (plain JSON, as the HTTP API takes it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Name
    namespace: Namespace
    #: exactly one of cron (5 fields, UTC), every ("10m") and at (one firing)
    cron: str | None = None
    every: str | None = None
    at: datetime | None = None
    #: exactly one of: an experiment file's text, or operations (``vm snapshot web[1-3] s1``: one
    #: ``TargetedOp(op="snapshot", target="web[1-3]", params=SnapshotParams(name="s1"))``)
    experiment: str | None = None
    #: where the experiment came from, for people
    source: str = ""
    operations: list[TargetedOp] | None = Field(default=None, min_length=1, max_length=MAX_OPERATIONS)
    missed: Literal["once", "skip"] = "once"

    @model_validator(mode="after")
    def _one_of_each(self) -> ScheduleSpec:
        if sum(x is not None for x in (self.cron, self.every, self.at)) != 1:
            raise ValueError("give exactly one of --cron, --every and --at")
        if (self.experiment is None) == (self.operations is None):
            raise ValueError("give either --experiment FILE or a vm command after --")
        return self


def check(spec: ScheduleSpec, now: datetime) -> None:
    """Refuse a schedule that could never fire as meant (before anything is written)."""
    if spec.cron is not None and (len(spec.cron.split()) != 5 or not croniter.is_valid(spec.cron)):
        raise InvalidInput(f"bad cron expression {spec.cron!r}",
                           hint='five fields, minute hour day-of-month month day-of-week, in UTC: "0 2 * * *"')
    if spec.every is not None:
        every_seconds(spec.every)
    if spec.at is not None and _aware(spec.at) <= now:
        raise InvalidInput(f"{spec.at.isoformat()} is in the past", hint="give a future time (UTC unless stated)")
    if spec.experiment is not None:
        experiment.load(spec.experiment)
    # operations: each checked itself (``TargetedOp``), as the CLI's would be


class Firing(BaseModel):
    slot: datetime
    fired_at: datetime
    state: Literal["fired", "skipped", "failed"]
    by: str = ""
    #: the experiment run it started
    run: int | None = None
    #: the jobs it created (for a run: its steps' parent jobs)
    jobs: list[int] = Field(default_factory=list)
    error: str | None = None


class Schedule(_Record):
    name: str
    namespace: str
    #: "cron 0 2 * * *", "every 10m" or "at 2026-12-01T09:00:00Z"
    when: str
    #: "experiment <source>", or the operations as vm commands ("vm snapshot web[1-3] name=s1")
    what: str
    paused: bool
    missed: str
    created_at: datetime | None
    by: str
    #: the next firing, as RedBeat will do it; None when paused or done
    next_at: datetime | None
    #: the last slot claimed (fired or skipped)
    last_slot: datetime | None
    history: list[Firing] = Field(default_factory=list)


def lock(namespace: str, name: str) -> LockName:
    """The one lock of a schedule: its record, its RedBeat entry and its history are written under it."""
    return other_lock(f"schedule:{namespace}:{name}")


def _target(h: dict[str, str]) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(h["target"]))


def operations(h: dict[str, str]) -> list[TargetedOp] | None:
    """A stored schedule's operations (None: it runs an experiment)."""
    target = _target(h)
    if "command" in target:  # stored by a vmorch that ran a command line: never run as one
        raise InvalidInput(f"schedule {h['name']!r} was stored by an older vmorch as a command line",
                           hint="remove it and add it again")
    raw = target.get("operations")
    return None if raw is None else [TargetedOp.model_validate(o) for o in raw]


def describe(h: dict[str, str]) -> str:
    target = _target(h)
    if "experiment" in target:
        return f"experiment {target.get('source') or '(inline)'}"
    if "command" in target:
        return "vmorch " + " ".join(target["command"]) + " (stored by an older vmorch: add it again)"
    ops = operations(h) or []
    return "; ".join(o.describe() for o in ops)


def redbeat_app(settings: Settings) -> Celery:
    """The Celery app with RedBeat's settings, for the scheduler and for editing entries.

    RedBeat gets its Redis client as an object (``app.redbeat_redis``), never as a URL in the
    config: Celery masks a setting only by its name, and ``redbeat_redis_url`` is not a name it
    masks, so ``celery inspect conf`` and Flower's worker page printed the Redis password. The URL
    left in the config (RedBeat's banner reads it) has its password redacted.
    """
    from orchestrator.control.queue import make_app
    from orchestrator.store.redisconn import connect, redact

    url = settings.resolved_redis_url()
    app = make_app(settings)
    # Lazy: no connection is opened until RedBeat's first command (ScheduleStore puts its own client here).
    app.redbeat_redis = connect(url)
    app.conf.update(
        redbeat_redis_url=redact(url),
        redbeat_redis_options={},
        redbeat_key_prefix=keys.REDBEAT_PREFIX,
        redbeat_lock_timeout=settings.scheduler_lock_timeout,
        beat_max_interval=settings.scheduler_tick,
        # No result backend: without this, beat adds its daily "celery.backend_cleanup" entry, whose
        # task goes to a queue nobody consumes (and its RedBeat key outlives every schedule).
        result_expires=None,
        # A firing whose scheduler died is delivered again to the standby after this long (kombu
        # restores unacked messages every 10 s): firings are idempotent per slot (``firing.fire``),
        # so a redelivery of one still running makes nothing twice.
        broker_transport_options={**(app.conf.broker_transport_options or {}),
                                   "visibility_timeout": FIRING_REDELIVERY_S},
    )
    return app


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def beat_schedule(h: dict[str, str]) -> Any:
    """The celery schedule of a stored schedule. Interval and one-off schedules are rrules anchored
    at their creation (or time), so their slots don't drift with the scheduler's latency."""
    from celery.schedules import crontab
    from redbeat.schedules import rrule

    kind, spec = h["kind"], h["spec"]
    if kind == "cron":
        minute, hour, dom, month, dow = spec.split()
        return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)
    if kind == "every":
        n = every_seconds(spec)
        return rrule("SECONDLY", dtstart=_anchor(h) + timedelta(seconds=n), interval=n)
    return rrule("SECONDLY", dtstart=datetime.fromtimestamp(float(spec), UTC), count=1)


def _anchor(h: dict[str, str]) -> datetime:
    return datetime.fromtimestamp(math.floor(float(h["created_at"])), UTC)


def current_slot(h: dict[str, str], now: float) -> float | None:
    """The scheduled time a firing at ``now`` stands for (a little early counts: beat's clock)."""
    kind, spec = h["kind"], h["spec"]
    if kind == "cron":
        it = croniter(spec, datetime.fromtimestamp(now + 1, UTC))
        return float(it.get_prev(float))
    if kind == "every":
        n = every_seconds(spec)
        anchor = _anchor(h).timestamp()
        k = math.floor((now + 0.5 - anchor) / n)
        return anchor + k * n if k >= 1 else None
    at = float(spec)
    return at if now + 1 >= at else None


def next_slot(h: dict[str, str], now: float) -> float | None:
    if h.get("paused") == "1":
        return None
    kind, spec = h["kind"], h["spec"]
    if kind == "cron":
        return float(croniter(spec, datetime.fromtimestamp(now, UTC)).get_next(float))
    if kind == "every":
        n = every_seconds(spec)
        anchor = _anchor(h).timestamp()
        return anchor + max(1, math.floor((now - anchor) / n) + 1) * n
    at = float(spec)
    return at if at > float(h.get("last_slot") or 0) else None


class ScheduleStore:
    """Our records and the RedBeat entries. # LOCK: writers hold ``lock(namespace, name)`` (``locked``)."""

    def __init__(self, client: Connection) -> None:
        self.client = client
        self.redis = client.redis
        self._app: Celery | None = None

    def locked(self, namespace: str, name: str) -> AbstractContextManager[Holding]:
        """Hold the schedule's lock, for the writers below."""
        return self.client.locks.hold(lock(namespace, name), timeout=self.client.settings.submit_lock_timeout)

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = redbeat_app(self.client.settings)
            # RedBeat's client is our client: no second connection pool to leak
            self._app.redbeat_redis = self.redis
        return self._app

    def raw(self, namespace: str, name: str) -> dict[str, str]:
        h = cast(dict[str, str], self.redis.hgetall(keys.schedule(namespace, name)))
        if not h:
            raise NotFound(f"no schedule {name!r} in namespace {namespace!r}", hint="see 'vmorch schedule list'")
        return h

    def add(self, spec: ScheduleSpec, by: str) -> None:
        locks.require(lock(spec.namespace, spec.name))  # LOCK: schedule
        now = self.client.store.redis_time()
        check(spec, datetime.fromtimestamp(now, UTC))
        key = keys.schedule(spec.namespace, spec.name)
        if self.redis.exists(key):
            raise AlreadyExists(f"schedule {spec.name!r} already exists in namespace {spec.namespace!r}",
                                hint="remove it first ('vmorch schedule remove NAME'), or pick another name")
        kind, when = (("cron", spec.cron) if spec.cron is not None else ("every", spec.every)
                      if spec.every is not None else ("at", f"{_aware(spec.at).timestamp():.6f}" if spec.at else ""))
        assert when is not None
        target = {"experiment": spec.experiment, "source": spec.source} if spec.experiment is not None \
            else {"operations": [o.model_dump(mode="json") for o in spec.operations or []]}
        h = {"name": spec.name, "namespace": spec.namespace, "kind": kind, "spec": when, "target": json.dumps(target),
             "paused": "", "missed": spec.missed, "created_at": f"{now:.6f}", "by": by, "last_slot": ""}
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=cast(Any, h))
        pipe.sadd(keys.schedules(spec.namespace), spec.name)
        pipe.execute()
        self._save_entry(h, enabled=True, last_run_at=datetime.fromtimestamp(now, UTC))

    def _entry(self, h: dict[str, str], enabled: bool) -> Any:
        from redbeat import RedBeatSchedulerEntry

        return RedBeatSchedulerEntry(name=f"{h['namespace']}/{h['name']}", task=FIRE_TASK, schedule=beat_schedule(h),
                                     args=[h["namespace"], h["name"]], options={"queue": keys.SCHEDULE_QUEUE},
                                     enabled=enabled, app=self.app)

    def _save_entry(self, h: dict[str, str], *, enabled: bool, last_run_at: datetime | None = None) -> None:
        entry = self._entry(h, enabled)
        if last_run_at is not None:
            # Otherwise RedBeat counts a new entry as never run, hence due at once.
            entry.last_run_at = last_run_at
        entry.save()

    def set_paused(self, namespace: str, name: str, paused: bool) -> None:
        locks.require(lock(namespace, name))  # LOCK: schedule
        h = self.raw(namespace, name)
        self.redis.hset(keys.schedule(namespace, name), "paused", "1" if paused else "")
        self._save_entry(h, enabled=not paused)

    def remove(self, namespace: str, name: str) -> None:
        locks.require(lock(namespace, name))  # LOCK: schedule
        h = self.raw(namespace, name)
        self._entry(h, True).delete()
        self.redis.delete(keys.schedule(namespace, name), keys.schedule_history(namespace, name))
        self.redis.srem(keys.schedules(namespace), name)

    def names(self, namespace: str) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(keys.schedules(namespace))))

    def get(self, namespace: str, name: str, *, history: int = 10) -> Schedule:
        h = self.raw(namespace, name)
        now = self.client.store.redis_time()
        what = describe(h)
        when = f"at {datetime.fromtimestamp(float(h['spec']), UTC).isoformat()}" if h["kind"] == "at" \
            else f"{h['kind']} {h['spec']}"
        nxt = next_slot(h, now)
        raw = cast(list[str], self.redis.lrange(keys.schedule_history(namespace, name), 0, history - 1))
        return Schedule(name=h["name"], namespace=h["namespace"], when=when, what=what, paused=h["paused"] == "1",
                        missed=h["missed"], created_at=ts(h["created_at"]), by=h.get("by", ""),
                        next_at=ts(f"{nxt:.6f}") if nxt is not None else None,
                        last_slot=ts(h.get("last_slot")), history=[Firing(**json.loads(f)) for f in raw])

    # -- firing (the scheduler process) -------------------------------------------------

    def due(self, namespace: str, name: str, now: float) -> tuple[dict[str, str], float, bool] | None:
        """The slot a firing at ``now`` stands for: (schedule, slot, skip), or None if there is none to
        run (paused, removed, not due, or already recorded). Claims nothing: see ``claim``.

        # LOCK: the caller holds lock(namespace, name).
        """
        locks.require(lock(namespace, name))
        try:
            h = self.raw(namespace, name)
        except NotFound:
            return None  # removed after beat sent the firing
        slot = current_slot(h, now)
        if h["paused"] == "1" or slot is None or slot <= float(h.get("last_slot") or 0):
            return None  # paused, not due, or a duplicate: another firing recorded this slot
        return h, slot, h["missed"] == "skip" and now - slot > GRACE

    def claim(self, namespace: str, name: str, slot: float) -> bool:
        """Mark ``slot`` fired; False if another firing of it (or of a later slot) got there first.

        # LOCK: the caller holds lock(namespace, name).
        """
        locks.require(lock(namespace, name))
        key = keys.schedule(namespace, name)
        last = self.redis.hget(key, "last_slot")
        if not self.redis.exists(key) or slot <= float(last or 0):
            return False
        self.redis.hset(key, "last_slot", f"{slot:.6f}")
        return True

    def record(self, namespace: str, name: str, firing: Firing) -> None:
        """# LOCK: the caller holds lock(namespace, name)."""
        locks.require(lock(namespace, name))
        key = keys.schedule_history(namespace, name)
        if not self.redis.exists(keys.schedule(namespace, name)):
            return  # removed meanwhile: its history went with it
        pipe = self.redis.pipeline()
        pipe.lpush(key, firing.model_dump_json())
        pipe.ltrim(key, 0, HISTORY - 1)
        pipe.execute()
