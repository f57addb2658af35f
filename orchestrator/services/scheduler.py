"""``vmorch scheduler``: celery beat with RedBeat, and the consumer of the firings it sends.

Beat runs in a thread of this process, so a SIGKILL takes both down together (an embedded beat
in a child process would outlive it and keep the lock). Any number of schedulers may run: RedBeat's
lock lets one beat send firings; the others wait, and one takes over within the lock's timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from orchestrator.model.settings import Settings
from orchestrator.services import firing as firing_
from orchestrator.services import schedules
from orchestrator.services.client import RedisClient
from orchestrator.store import keys

log = logging.getLogger(__name__)


def run(settings: Settings, *, loglevel: str = "INFO") -> None:
    from celery.beat import Service
    from redbeat import RedBeatScheduler

    app = schedules.redbeat_app(settings)
    me = f"scheduler@{socket.gethostname()}:{os.getpid()}"

    # Acknowledged once done: a firing lost with its scheduler is delivered again to the standby
    # (after schedules.FIRING_REDELIVERY_S), and runs exactly once per slot (firing.fire).
    @app.task(name=schedules.FIRE_TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
    def fire(namespace: str, name: str) -> None:
        client = RedisClient(settings)
        firing = firing_.fire(client, namespace, name, by=me)
        if firing is not None:
            log.info("schedule %s/%s: slot %s %s %s", namespace, name, firing.slot.isoformat(), firing.state,
                     firing.error or firing.jobs)

    beat = Service(app, scheduler_cls=RedBeatScheduler, max_interval=settings.scheduler_tick)
    stopping = threading.Event()
    beat_died = threading.Event()

    def run_beat() -> None:
        try:
            beat.start()
        finally:
            if not stopping.is_set():
                # Its lock lost (Redis restarted, say): a scheduler without beat would consume firings
                # and never send one. Stop the whole process; its supervisor starts a fresh one.
                log.error("beat stopped unexpectedly; stopping the scheduler so that it is restarted")
                beat_died.set()
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run_beat, name="vmorch-beat", daemon=True)
    thread.start()
    try:
        worker = app.Worker(queues=[keys.SCHEDULE_QUEUE], pool="threads", concurrency=2, hostname=me,
                            loglevel=loglevel, without_gossip=True, without_mingle=True, without_heartbeat=True)
        worker.start()
    finally:
        stopping.set()
        beat.stop()  # releases RedBeat's lock: a standby takes over at once
        thread.join(timeout=2)  # a standby may be blocked on the lock: it is a daemon thread
    if beat_died.is_set():
        sys.exit(1)
