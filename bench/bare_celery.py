"""The baseline: a bare Celery worker with vmorch's broker, pool and worker settings, one no-op task."""

from __future__ import annotations

import sys

from orchestrator.queue import make_app
from orchestrator.settings import Settings

QUEUE = "bench.bare"


def app():  # type: ignore[no-untyped-def]
    celery = make_app(Settings())
    # The round trip is measured to a result, so the baseline needs a result backend on the same Redis.
    celery.conf.update(result_backend=Settings().resolved_redis_url(), task_ignore_result=False)

    @celery.task(name="bench.noop")
    def noop() -> int:
        return 1

    return celery


if __name__ == "__main__":
    concurrency = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    app().Worker(queues=[QUEUE], pool="threads", concurrency=concurrency, loglevel="WARNING",
                 without_gossip=True, without_mingle=True, without_heartbeat=True).start()
