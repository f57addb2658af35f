"""What every part of the store shares: the client, the registered scripts, Redis's clock."""

from __future__ import annotations

from typing import cast

from redis import Redis

from orchestrator.store import keys
from orchestrator.store.scripts import Scripts


class StoreBase:
    def __init__(self, redis: Redis, *, host_down_after: float = 6.0) -> None:
        self.redis = redis
        self.host_down_after = host_down_after
        self.scripts = Scripts(redis)

    def redis_time(self) -> float:
        sec, usec = self.redis.time()
        return sec + usec / 1e6

    def lock_holder(self, lock_name: str) -> str | None:
        """The id ("<owner>:<pid>:<random>") of whoever holds ``lock_name`` now, or None."""
        return cast(str | None, self.redis.get(keys.lock_key(lock_name)))
