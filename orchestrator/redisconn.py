"""Redis clients. One place decides timeouts and retries."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .errors import ClusterUnavailable


def _retry(retries: int) -> Retry:
    # Rides over a Redis restart (a few seconds with AOF reload) instead of failing the job.
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries,
                 supported_errors=(RedisConnectionError, RedisTimeoutError, ConnectionResetError))


def connect(url: str, *, retries: int = 40, decode: bool = True) -> Redis:
    """A client for ordinary commands: bounded socket timeouts, retried on connection loss.

    ``decode=False`` gives bytes, for the disk chunks of ``vm move``.
    """
    return Redis.from_url(url, decode_responses=decode, socket_timeout=30, socket_connect_timeout=5,
                          retry=_retry(retries), health_check_interval=15)


def connect_for_locks(url: str, *, retries: int = 40) -> Redis:
    """A client for python-redis-lock.

    It must have ``socket_timeout=None``: the library waits with ``BLPOP`` for up to the
    lock's expiry and redis-py 8 would cut that off after its default 5 s.
    """
    return Redis.from_url(url, decode_responses=True, socket_timeout=None, socket_connect_timeout=5,
                          retry=_retry(retries), health_check_interval=15)


def ping(client: Redis, url: str) -> None:
    try:
        client.ping()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise ClusterUnavailable(
            f"cannot reach Redis at {shown(url)}: {exc}",
            hint="start a local cluster with 'vmorch up --detach', or pass --redis-url / set VMORCH_REDIS_URL",
        ) from None


def shown(url: str) -> str:
    """A Redis URL fit for messages and logs: its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
