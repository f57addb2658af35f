"""The client's calls for schedules: add, show, pause, remove (the records live in ``schedules``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.control.connection import Connection

if TYPE_CHECKING:
    from orchestrator.services.schedules import Schedule, ScheduleSpec, ScheduleStore


class Schedules(Connection):
    """The client's schedule calls; ``orchestrator.services.schedules`` (cron, RedBeat) is imported
    only by a command that uses schedules (CLI start-up time)."""

    _schedule_store: ScheduleStore | None = None

    @property
    def _schedules(self) -> ScheduleStore:
        if self._schedule_store is None:
            from orchestrator.services.schedules import ScheduleStore

            self._schedule_store = ScheduleStore(self)
        return self._schedule_store

    def add_schedule(self, spec: ScheduleSpec) -> Schedule:
        with self._schedules.locked(spec.namespace, spec.name):
            self._schedules.add(spec, self.actor)  # LOCK: schedule
        return self.schedule(spec.namespace, spec.name)

    def schedule(self, namespace: str, name: str, *, history: int = 10) -> Schedule:
        return self._schedules.get(namespace, name, history=history)

    def schedules(self, namespace: str) -> list[Schedule]:
        store = self._schedules
        return [store.get(namespace, n, history=1) for n in store.names(namespace)]

    def pause_schedule(self, namespace: str, name: str, paused: bool) -> Schedule:
        with self._schedules.locked(namespace, name):
            self._schedules.set_paused(namespace, name, paused)  # LOCK: schedule
        return self.schedule(namespace, name)

    def remove_schedule(self, namespace: str, name: str) -> None:
        with self._schedules.locked(namespace, name):
            self._schedules.remove(namespace, name)  # LOCK: schedule
