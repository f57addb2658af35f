"""Job dependencies (``--after``) and the wake-ups of the jobs they release.

A job with unmet dependencies is stored ``queued`` but *held*: it has no sequence number and
is not in its VM's mailbox, so no worker waits for it and the VM's other jobs run past it. When
its last dependency becomes final, the Lua step that finished that dependency gives it its place
in the VM's order (``store/lua/settle.lua``); the process that ran that step sends the wake-up. If that
process dies in between, the job is still in ``P:released`` and a worker's janitor sends it.

A job may also ask to wait some seconds once its dependencies are met (``delay_s``): it then
stays held, with its start time in ``P:delayed``, until a worker's janitor releases it (so the
delay is honoured to within a janitor's interval, ``VMORCH_HOST_DOWN_AFTER``/2).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from orchestrator.control.queue import WakeUp, enqueue_many
from orchestrator.model.errors import InvalidInput
from orchestrator.model.operation import Op
from orchestrator.store.jobstore import Released, Store

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

#: a dependency that must succeed (``--after``)
OK = "ok"
#: a dependency that only has to be final, whatever its state (an experiment's teardown)
FINAL = "final"
#: how long a released job may wait for its wake-up before a janitor sends it again
RESEND_AFTER = 5.0


def edges(after: Iterable[int], after_final: Iterable[int], ops: Iterable[Op], delay_s: float = 0.0) -> dict[int, str]:
    """The dependency edges of a batch; refuses what can't wait."""
    deps = {int(i): FINAL for i in after_final}
    deps.update({int(i): OK for i in after})  # needing success is the stronger of the two
    if deps or delay_s:
        bad = sorted({o.value for o in ops} & {Op.LAUNCH.value, Op.MOVE_OUT.value})
        if bad:
            raise InvalidInput(f"{bad[0]} jobs can't wait for other jobs",
                               hint="launch or move first, then give the next operations --after")
    if any(i <= 0 for i in deps):
        raise InvalidInput("job ids are positive integers", hint="see 'vmorch job list'")
    return deps


def wake(app: Celery, store: Store, released: Iterable[Released]) -> None:
    """Send the wake-ups of released jobs, then forget them (a duplicate wake-up is harmless)."""
    released = list(released)
    unsent = set()
    for w, exc in enqueue_many(app, (WakeUp(r.host, r.namespace, r.vm, r.id) for r in released)):
        log.warning("wake-up of released job %s not sent: %s", w.job_id, exc)  # a janitor sends it later
        unsent.add(w.job_id)
    store.woken([r for r in released if r.id not in unsent])


def release_due(app: Celery, store: Store, by: str = "") -> int:
    """Release and wake the delayed jobs whose time has come (an experiment step's ``wait:``)."""
    released = store.release_due(by)
    wake(app, store, released)
    return len(released)


def resend(app: Celery, store: Store, older_than: float = RESEND_AFTER) -> int:
    """Send again the wake-ups that a crash may have lost (see the module's docstring)."""
    stale = store.stale_released(older_than)
    if stale:
        log.warning("re-sending the wake-ups of %d released jobs", len(stale))
        wake(app, store, stale)
    return len(stale)
