"""What every request of the API shares: the settings, one RedisClient, the token store."""

from __future__ import annotations

import threading

from ..client import RedisClient
from ..settings import Settings
from ..tokens import TokenStore


class Backend:
    """Connects on first use, so the API starts (and answers 503) while Redis is still coming up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: RedisClient | None = None
        self._lock = threading.Lock()

    def client(self) -> RedisClient:
        with self._lock:
            if self._client is None:
                client = RedisClient(self.settings)
                # Made now, not lazily: every request's acting_as() view must share them.
                _ = client.locks, client.celery
                self._client = client
            return self._client

    def tokens(self) -> TokenStore:
        return TokenStore(self.client().redis)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.celery.close()
                self._client.locks.close()
                self._client.redis.close()
                self._client = None
