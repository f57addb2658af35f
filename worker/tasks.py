"""The one Celery task: a wake-up call for a VM's mailbox."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.control.queue import RUN_TASK
from orchestrator.model import logs
from orchestrator.model.errors import LockError

from .runner import Worker, run_message

log = logging.getLogger(__name__)


def register(app: Celery, worker: Worker) -> Any:
    @app.task(name=RUN_TASK, bind=True, max_retries=None, acks_late=True,  # type: ignore[untyped-decorator]
              reject_on_worker_lost=True)
    def run(self: Task[Any, Any], namespace: str, vm: str, job_id: int) -> None:
        try:
            with logs.bound(job=job_id, namespace=namespace, vm=vm):
                run_message(worker, namespace, vm, job_id)
        except (LockError, RedisConnectionError) as exc:
            # Nothing was written without the lock; try again (the job keeps its place in the order).
            log.warning("job %s: %s; retrying", job_id, exc)
            raise self.retry(exc=exc, countdown=1) from None

    return run
