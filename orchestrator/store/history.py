"""The store's history: each namespace's event stream, and the cluster-wide audit stream."""

from __future__ import annotations

from typing import cast

from orchestrator.model.records import Event
from orchestrator.store import keys
from orchestrator.store.base import StoreBase


class HistoryStore(StoreBase):
    def add_event(self, namespace: str | None, *, kind: str, state: str, by: str, detail: str = "",
                  vm: str = "", op: str = "") -> None:
        """Record a change that is not a job's (a namespace made, a host drained) and who asked.

        ``namespace=None``: a cluster-wide change, recorded in the audit stream.
        """
        stream = keys.events(namespace) if namespace is not None else keys.AUDIT
        self.redis.xadd(stream, {"at": f"{self.redis_time():.6f}", "kind": kind, "job": "", "vm": vm, "op": op,
                                 "state": state, "by": by, "detail": detail}, maxlen=100_000)

    def events(self, namespace: str, *, vm: str | None = None, job_id: int | None = None,
               limit: int = 100) -> list[Event]:
        """The newest ``limit`` events matching, oldest first."""
        out: list[Event] = []
        last = "+"
        while len(out) < limit:
            batch = cast(list[tuple[str, dict[str, str]]],
                         self.redis.xrevrange(keys.events(namespace), max=last, count=500))
            if last != "+":
                batch = batch[1:]  # the boundary entry was in the previous batch
            if not batch:
                break
            for entry_id, fields in batch:
                if (vm is None or fields.get("vm") == vm) and (job_id is None or fields.get("job") == str(job_id)):
                    out.append(Event.from_fields(entry_id, fields))
                    if len(out) == limit:
                        break
            last = batch[-1][0]
        return out[::-1]
