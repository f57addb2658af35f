"""A client's connections to the cluster, shared by every part of the client (``orchestrator.services.client``)."""

from __future__ import annotations

import copy
import getpass
import socket
import threading
from typing import TYPE_CHECKING, Self

from orchestrator.control.locks import LockManager
from orchestrator.model.settings import Settings
from orchestrator.store import layout
from orchestrator.store.jobstore import Store
from orchestrator.store.redisconn import connect, ping
from orchestrator.store.runs import RunStore

if TYPE_CHECKING:
    from celery import Celery


def who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class Connection:
    """A client's connections: Redis, the job store, the lock manager, the Celery app, and who asks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.resolved_redis_url()
        self.redis = connect(self.url, retries=2)
        ping(self.redis, self.url)
        layout.check(self.redis)  # LayoutMismatch: this Redis holds another vmorch's keys
        self.store = Store(self.redis, host_down_after=settings.host_down_after)
        self.runs = RunStore(self.redis)
        self._locks: LockManager | None = None
        self._celery: Celery | None = None
        self._local = threading.local()
        #: who the history says asked (the API sets an API token's name per request)
        self.actor = who()

    def acting_as(self, actor: str) -> Self:
        """This client (same connections) recording ``actor`` as the one who asks."""
        view = copy.copy(self)
        view.actor = actor
        return view

    @property
    def locks(self) -> LockManager:
        if self._locks is None:
            self._locks = LockManager(self.url, owner=f"client@{socket.gethostname()}",
                                      expire=self.settings.lock_expire)
        return self._locks

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            from orchestrator.control.queue import make_app

            self._celery = make_app(self.settings)
        return self._celery
