"""The Celery side: one app definition shared by submitters and workers.

The message is only a wake-up call for a VM: ``(namespace, vm, job_id)``. The job itself
(operation, order, state) lives in the job store, so a message that arrives late, early
or twice changes nothing about the order in which the VM's jobs run.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from orchestrator.model.errors import InvalidInput
from orchestrator.model.settings import Settings
from orchestrator.store import keys
from orchestrator.store.redisconn import celery_broker

if TYPE_CHECKING:
    from celery import Celery

RUN_TASK = "vmorch.run"


def make_app(settings: Settings) -> Celery:
    """The Celery app. Its config holds no secret that Celery would print unmasked (``celery inspect
    conf``, Flower's worker page): the broker URL and ``broker_*`` options are masked by Celery's own
    rules (tests/test_secrets.py); add a setting with a password only under a name Celery masks."""
    from celery import Celery  # imported here: a CLI command that only reads must not pay for Celery

    broker, transport_options = celery_broker(settings.resolved_redis_url())
    app = Celery("vmorch", broker=broker, set_as_current=False)
    app.conf.update(
        # A job is acked only after it finished; a worker that dies mid-way gets it redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout, **transport_options},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_create_missing_queues=True,
        enable_utc=True,
        # Task events (what Flower and 'celery events' show) only while a monitor asks for them:
        # Flower turns them on in every worker by itself ('celery control enable_events' does too),
        # and a worker turns them off again when nobody asked for a while (worker/tasks.py);
        # 'vmorch worker --task-events' sends them from the start, always. Always on, they took a third of
        # a worker's busy time, and 1,000 launches ran at 174 instead of 236 VMs/s (docs/benchmarks.md).
        # Never "task-sent": a second broker write per job on the submitter's path; the job's history
        # already says who queued it and when.
        worker_send_task_events=False,
        broker_use_ssl=broker_ssl(broker),
    )
    return app


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def broker_ssl(url: str) -> dict[str, Any] | None:
    """For a ``rediss://`` URL, kombu's TLS options, read from the URL's own ``ssl_*`` parameters.

    redis-py reads them from the URL by itself; kombu doesn't, and without options it would
    silently skip checking the server's certificate. So the certificate is required unless
    the URL says ``ssl_cert_reqs=none``, exactly as for redis-py.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    wanted = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if wanted not in _CERT_REQS:
        raise InvalidInput(f"ssl_cert_reqs={query['ssl_cert_reqs']!r} in the Redis URL",
                           hint="use ssl_cert_reqs=required, optional or none")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[wanted]}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in query:
            options[name] = query[name]
    return options


def enqueue(app: Celery, host: str, namespace: str, vm: str, job_id: int) -> None:
    _send(app, WakeUp(host, namespace, vm, job_id))


@dataclass(frozen=True)
class WakeUp:
    """The message of one job: which host's queue, and the VM and job it names."""

    host: str
    namespace: str
    vm: str
    job_id: int


def enqueue_many(app: Celery, wakeups: Iterable[WakeUp]) -> list[tuple[WakeUp, Exception]]:
    """Send many wake-ups over one producer; returns those that could not be sent, with why.

    A batch's messages share the producer: taking one from the pool for each message cost a
    fifth of the message's time (``python -m bench B5``). One failure doesn't stop the rest.
    """
    todo = list(wakeups)
    failed: list[tuple[WakeUp, Exception]] = []
    done = 0
    try:
        with app.producer_or_acquire() as producer:
            for w in todo:
                try:
                    _send(app, w, producer)
                except Exception as exc:  # the caller decides what an unsent job becomes
                    failed.append((w, exc))
                done += 1
    except Exception as exc:  # no producer at all: nothing after ``done`` was sent
        failed += [(w, exc) for w in todo[done:]]
    return failed


def _send(app: Celery, w: WakeUp, producer: Any = None) -> None:
    app.send_task(RUN_TASK, args=[w.namespace, w.vm, w.job_id], queue=keys.queue(w.host), producer=producer)
