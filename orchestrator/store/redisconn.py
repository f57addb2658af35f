"""Redis clients. One place decides timeouts, retries and how a URL names the server.

Two URL forms are understood, by every part (worker, API, CLI, Celery):

* ``redis://[:PASSWORD@]HOST:PORT/DB`` -- one Redis server (also ``rediss://``, ``unix://``);
* ``sentinel://[:PASSWORD@]SENTINEL:PORT[,SENTINEL:PORT...]/DB?master=NAME`` -- the master
  that Redis Sentinel names ``NAME``, found through any of the listed sentinels and found
  again after a failover. ``PASSWORD`` is the master's; add ``&sentinel_password=...`` if
  the sentinels themselves ask for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

from orchestrator.model.errors import ClusterUnavailable, InvalidInput

SENTINEL_SCHEME = "sentinel://"


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        bad = InvalidInput(f"bad Sentinel URL {redact(url)!r}",
                           hint="write sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT]/DB?master=NAME")
        rest = url.removeprefix(SENTINEL_SCHEME)
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        auth, at, hosts = netloc.rpartition("@")
        password = unquote(auth.partition(":")[2]) or None if at else None
        params = parse_qs(query)
        master = params.get("master", [""])[0]
        try:
            sentinels = tuple((h.rpartition(":")[0] or h, int(h.rpartition(":")[2]) if ":" in h else 26379)
                              for h in hosts.split(",") if h)
            db = int(path or 0)
        except ValueError:
            raise bad from None
        if not sentinels or not master:
            raise bad
        return cls(sentinels, master, db, password, params.get("sentinel_password", [None])[0])

    def master_for(self, **kwargs: Any) -> Redis:
        sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
        if self.sentinel_password:
            sentinel_kwargs["password"] = self.sentinel_password
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        client = sentinel.master_for(self.master, db=self.db, password=self.password,  # type: ignore[no-untyped-call]
                                     **kwargs)
        return cast(Redis, client)

    def kombu_broker(self) -> tuple[str, dict[str, Any]]:
        """The same cluster as kombu spells it: ``;``-separated sentinel URLs plus transport options."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        url = ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)
        options: dict[str, Any] = {"master_name": self.master}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return url, options


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def redact(url: str) -> str:
    """The URL without its passwords, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    auth, at, tail = rest.rpartition("@")
    if at:
        user = auth.partition(":")[0]
        rest = f"{user}:***@{tail}"
    if "sentinel_password=" in rest:
        head, _, query = rest.partition("?")
        query = "&".join("sentinel_password=***" if p.startswith("sentinel_password=") else p
                         for p in query.split("&"))
        rest = f"{head}?{query}"
    return f"{scheme}{sep}{rest}"


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and extra transport options for a vmorch Redis URL."""
    if is_sentinel(url):
        return SentinelUrl.parse(url).kombu_broker()
    return url, {}


def _retry(retries: int) -> Retry:
    # Rides over a Redis restart (a few seconds with AOF reload) instead of failing the job.
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries,
                 supported_errors=(RedisConnectionError, RedisTimeoutError, ConnectionResetError))


def _client(url: str, **kwargs: Any) -> Redis:
    if is_sentinel(url):
        return SentinelUrl.parse(url).master_for(**kwargs)
    return Redis.from_url(url, **kwargs)


def connect(url: str, *, retries: int = 40, decode: bool = True) -> Redis:
    """A client for ordinary commands: bounded socket timeouts, retried on connection loss.

    ``decode=False`` gives bytes, for the disk chunks of ``vm move``.
    """
    return _client(url, decode_responses=decode, socket_timeout=30, socket_connect_timeout=5,
                   retry=_retry(retries), health_check_interval=15)


def connect_quick(url: str, *, timeout: float = 0.5, retries: int = 0) -> Redis:
    """A client that gives up soon: for shell completion, scrapes and checks, which must never hang."""
    return _client(url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout,
                   retry=_retry(retries))


def connect_for_locks(url: str, *, retries: int = 40) -> Redis:
    """A client for python-redis-lock.

    It must have ``socket_timeout=None``: the library waits with ``BLPOP`` for up to the
    lock's expiry and redis-py 8 would cut that off after its default 5 s.
    """
    return _client(url, decode_responses=True, socket_timeout=None, socket_connect_timeout=5,
                   retry=_retry(retries), health_check_interval=15)


def ping(client: Redis, url: str) -> None:
    try:
        client.ping()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise ClusterUnavailable(
            f"cannot reach Redis at {redact(url)}: {exc}",
            hint="start a local cluster with 'vmorch up --detach', or pass --redis-url / set VMORCH_REDIS_URL",
        ) from None

