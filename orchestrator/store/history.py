"""The store's history: each VM's and each job's own, the namespace's recent one, the cluster's audit.

Every change is written in the same atomic step as the change itself (``lua/event.lua``), to three
places of their own sizes (``keys.py``): the VM's stream, the job's list and the namespace's stream.
A lookup reads the one it needs, newest first, as far as it asks (``XREVRANGE COUNT``, ``LRANGE``):
never a scan of the namespace's stream, and one busy VM can't push out another VM's history. What a
size trimmed is counted, and a reader is told (``History.trimmed``): history never disappears silently.
"""

from __future__ import annotations

import json
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from orchestrator.model.records import Event
from orchestrator.store import keys
from orchestrator.store.base import StoreBase


class History(BaseModel):
    """Some history, oldest first, and how much older history is no longer kept."""

    model_config = ConfigDict(frozen=True)

    events: list[Event]
    #: how many older entries are no longer kept (trimmed to the history's size): 0 = nothing went
    trimmed: int = Field(default=0, ge=0)


class HistoryStore(StoreBase):
    def add_event(self, namespace: str | None, *, kind: str, state: str, by: str, detail: str = "",
                  vm: str = "", op: str = "") -> None:
        """Record a change that is not a job's (a namespace made, a host drained) and who asked.

        ``namespace=None``: a cluster-wide change, recorded in the audit stream; else in the namespace's
        stream, and in the VM's if it names one.
        """
        fields: dict[FieldT, EncodableT] = {"at": f"{self.redis_time():.6f}", "kind": kind, "job": "", "vm": vm,
                                            "op": op, "state": state, "by": by, "detail": detail}
        if namespace is None:
            self.redis.xadd(keys.AUDIT, fields, maxlen=100_000)
            return
        pipe = self.redis.pipeline()
        pipe.xadd(keys.events(namespace), fields, maxlen=keys.EVENTS_MAX)
        if vm:
            pipe.xadd(keys.vm_history(namespace, vm), fields, maxlen=keys.VM_HISTORY_MAX)
        pipe.execute()

    def history(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
                limit: int = 100) -> History:
        """The newest ``limit`` entries, oldest first: a job's own (``job_id``), else a VM's (``vm``), else
        the namespace's recent history; with how many older ones were trimmed."""
        if job_id is not None:
            return self._job_history(job_id, vm, limit)
        stream = keys.vm_history(namespace, vm) if vm is not None else keys.events(namespace)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(stream, count=limit)
        pipe.xinfo_stream(stream)
        rows, info = pipe.execute(raise_on_error=False)
        if isinstance(rows, ResponseError):
            raise rows
        entries = cast(list[tuple[str, dict[str, str]]], rows)
        events = [Event.from_fields(entry_id, fields) for entry_id, fields in reversed(entries)]
        return History(events=events, trimmed=_trimmed(info))

    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]:
        """The newest ``limit`` entries, oldest first (``history`` without the count of what was trimmed)."""
        return self.history(namespace, vm=vm, job_id=job_id, limit=limit).events

    def _job_history(self, job_id: int, vm: str | None, limit: int) -> History:
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(keys.job_history(job_id), -limit, -1)
        pipe.hget(keys.job(job_id), "history_trimmed")
        rows, trimmed = pipe.execute()
        events = [event_from_row(json.loads(row)) for row in cast(list[str], rows)]
        if vm is not None:
            events = [e for e in events if e.vm == vm]
        return History(events=events, trimmed=int(trimmed or 0))


def event_from_row(row: list[Any]) -> Event:
    """A job's history entry (a JSON array of ``keys.HISTORY_FIELDS``) as an Event."""
    fields = {name: "" if value is None else str(value) for name, value in zip(keys.HISTORY_FIELDS, row, strict=False)}
    return Event.from_fields(fields.pop("id", ""), fields)


def _trimmed(info: object) -> int:
    """What a stream trimmed: every entry ever added but no longer in it (0 for a stream not there)."""
    if not isinstance(info, dict):
        return 0
    return max(0, int(info.get("entries-added", 0) or 0) - int(info.get("length", 0) or 0))
