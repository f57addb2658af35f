"""The baseline: a bare Celery worker with vmorch's broker, app settings, pool and worker flags, one no-op task.

    python -m bench.bare_celery QUEUE [CONCURRENCY]
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from orchestrator.control.queue import make_app
from orchestrator.model.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

QUEUE = "bench.bare"
TASK = "bench.noop"


def app(redis_url: str | None = None) -> Celery:
    settings = Settings(redis_url=redis_url) if redis_url else Settings()
    celery = make_app(settings)
    # The round trip is measured to a result, so the baseline needs a result backend on the same Redis.
    celery.conf.update(result_backend=settings.resolved_redis_url(), task_ignore_result=False)

    @celery.task(name=TASK)  # type: ignore[untyped-decorator]
    def noop() -> int:
        return 1

    return celery


if __name__ == "__main__":
    queue = sys.argv[1] if len(sys.argv) > 1 else QUEUE
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    # the same flags as worker.main.consume
    app().Worker(queues=[queue], pool="threads", concurrency=concurrency, loglevel="WARNING",
                 without_gossip=True, without_mingle=True, without_heartbeat=True).start()
