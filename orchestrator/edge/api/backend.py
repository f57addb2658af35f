"""What every request of the API shares: the settings, one RedisClient, the token store."""

from __future__ import annotations

import threading

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.model.settings import Settings
from orchestrator.services.client import RedisClient
from orchestrator.store import layout
from orchestrator.store.redisconn import connect_quick
from orchestrator.store.tokens import TokenStore


class Backend:
    """Connects on first use, so the API starts (and answers 503) while Redis is still coming up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: RedisClient | None = None
        self._lock = threading.Lock()
        self._async: AsyncRedis | None = None
        self._check_layout()

    def _check_layout(self) -> None:
        """At start: refuse to serve a Redis that holds another vmorch layout (``LayoutMismatch``).
        A Redis not up yet is checked by the first request's connection instead."""
        redis = connect_quick(self.settings.resolved_redis_url(), timeout=1.0)
        try:
            layout.check(redis)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass
        finally:
            redis.close()

    def client(self) -> RedisClient:
        with self._lock:
            if self._client is None:
                client = RedisClient(self.settings)
                # Made now, not lazily: every request's acting_as() view must share them.
                _ = client.locks, client.celery
                self._client = client
            return self._client

    def async_redis(self) -> AsyncRedis:
        """For the event loop's own work (token checks, event streams); made in the loop that uses it."""
        if self._async is None:
            self._async = AsyncRedis.from_url(self.settings.resolved_redis_url(), decode_responses=True,
                                              socket_timeout=30, socket_connect_timeout=5)
        return self._async

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None
        self.close()

    def tokens(self) -> TokenStore:
        return TokenStore(self.client().redis)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.celery.close()
                self._client.locks.close()
                self._client.redis.close()
                self._client = None
