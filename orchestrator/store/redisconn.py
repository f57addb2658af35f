"""Redis clients. One place decides timeouts, retries and how a URL names the server.

Two URL forms are understood, by every part (worker, API, CLI, Celery):

* ``redis://[:PASSWORD@]HOST:PORT/DB`` -- one Redis server (also ``rediss://``, ``unix://``);
* ``sentinel://[:PASSWORD@]SENTINEL:PORT[,SENTINEL:PORT...]/DB?master=NAME`` -- the master
  that Redis Sentinel names ``NAME``, found through any of the listed sentinels and found
  again after a failover. ``PASSWORD`` is the master's; add ``&sentinel_password=...`` if
  the sentinels themselves ask for one.

Calls under a lease (guarantee 6): inside ``bounded_by(remaining)`` every call this context makes
through a client of this module ends within ``remaining()`` seconds. Each socket wait (connect,
send, read) is cut to what is left, and the retries (40, with back-off, to ride over a Redis
restart) stop when nothing is left, raising ``LeaseExpired`` instead of trying again. The lock
module sets the bound for as long as a lock is held, so no Redis call can outlive the lease of
the lock it is made under. Outside a bound the clients behave as configured.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, quote, unquote

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.connection import AbstractConnection, Connection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from orchestrator.model.errors import ClusterUnavailable, InvalidInput, LeaseExpired

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
        sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_") or k == "retry"}
        if self.sentinel_password:
            sentinel_kwargs["password"] = self.sentinel_password
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        # The sentinels are asked where the master is at each reconnection: bounded like the master.
        # (Their clients are plain Redis objects, which take no connection class: their pools do.)
        for asked in sentinel.sentinels:
            asked.connection_pool.connection_class = _lease_bound(Connection)
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


# -- calls bounded by a lease -----------------------------------------------------------

#: the bound of this context (thread, task): seconds left, read at each step; None: unbounded
_bound: contextvars.ContextVar[Callable[[], float] | None] = contextvars.ContextVar("vmorch_redis_bound",
                                                                                    default=None)
#: a read that starts with nothing left still waits this long: a reply already here is taken, and a
#: missing one times out (redis-py then drops the connection, whose reply would come out of turn)
_LAST_READ_S = 0.001


@contextmanager
def bounded_by(remaining: Callable[[], float], *, nested: bool = True) -> Iterator[None]:
    """Every Redis call of this context inside ends within ``remaining()`` seconds, or raises ``LeaseExpired``.

    ``remaining`` is called at each step (it follows a lease that renewals extend). Nested bounds
    apply together (the tightest wins) unless ``nested=False``: a release after the lease, say,
    has its own budget.
    """
    outer = _bound.get()
    bound = remaining if outer is None or not nested else (lambda: min(outer(), remaining()))
    token = _bound.set(bound)
    try:
        yield
    finally:
        _bound.reset(token)


def budget(seconds: float) -> Callable[[], float]:
    """A bound of ``seconds`` from now, for ``bounded_by``."""
    deadline = time.monotonic() + seconds
    return lambda: deadline - time.monotonic()


def bound_left() -> float | None:
    """Seconds left to this context's Redis calls; None if they are not bounded."""
    bound = _bound.get()
    return None if bound is None else bound()


def _expired(why: str) -> LeaseExpired:
    return LeaseExpired(f"a Redis call could not finish within the lease of the lock it was made under ({why})",
                        hint="Redis did not answer in time; the job runs again once it does")


_C = TypeVar("_C", bound=AbstractConnection)


class _LeaseBound(AbstractConnection):
    """Mixed in front of redis-py's connection classes: waits on the socket cut to the bound (``bounded_by``)."""

    def connect(self) -> None:
        saved = self._cut("connect", starting=True)
        try:
            super().connect()  # type: ignore[no-untyped-call]
        finally:
            self._restore(saved)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        saved = self._cut("send", starting=True)
        try:
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]
        finally:
            self._restore(saved)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        saved = self._cut("read", starting=False)
        try:
            return super().read_response(*args, **kwargs)
        finally:
            self._restore(saved)

    def _cut(self, what: str, *, starting: bool) -> tuple[float | None] | None:
        """Cut this call's waits to the bound; returns the connect timeout to restore, or None if unbounded.

        Only the socket's own timeout is cut, never ``socket_timeout``: a parser reads that at connect
        time and would keep the cut value for the connection's life.
        """
        left = bound_left()
        if left is None:
            return None
        if left <= 0:
            if starting:  # nothing sent yet: the connection stays clean
                raise _expired(f"no time left to {what}")
            left = _LAST_READ_S
        saved = self.socket_connect_timeout
        self.socket_connect_timeout = left if saved is None else min(saved, left)
        sock = self._sock
        if sock is not None:
            sock.settimeout(left if self.socket_timeout is None else min(self.socket_timeout, left))
        return (saved,)

    def _restore(self, saved: tuple[float | None] | None) -> None:
        if saved is None:
            return
        self.socket_connect_timeout = saved[0]
        sock = self._sock
        if sock is not None:
            sock.settimeout(self.socket_timeout)


@cache
def _lease_bound(cls: type[_C]) -> type[_C]:
    return cast(type[_C], type(f"LeaseBound{cls.__name__}", (_LeaseBound, cls), {}))


class _LeaseRetry(Retry):
    """redis-py's retry, but with no attempt and no back-off past the bound (``bounded_by``)."""

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> Any:
        if bound_left() is None:
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)
        self._backoff.reset()  # type: ignore[no-untyped-call]
        failures = 0
        while True:
            left = bound_left()
            if left is not None and left <= 0:
                raise _expired("no time left to try")
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                left = bound_left()
                if left is not None and left <= 0:
                    raise _expired(f"{type(error).__name__}: {error}") from error
                if 0 <= self._retries < failures:
                    raise error
                backoff = self._backoff.compute(failures)
                if backoff > 0:
                    time.sleep(backoff if left is None else min(backoff, left))


def _retry(retries: int) -> Retry:
    # Rides over a Redis restart (a few seconds with AOF reload) instead of failing the job.
    return _LeaseRetry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries,
                       supported_errors=(RedisConnectionError, RedisTimeoutError, ConnectionResetError))


def _client(url: str, **kwargs: Any) -> Redis:
    if is_sentinel(url):
        return SentinelUrl.parse(url).master_for(connection_class=_lease_bound(SentinelManagedConnection), **kwargs)
    connection_class = parse_url(url).get("connection_class", Connection)  # type: ignore[no-untyped-call]
    return Redis.from_url(url, connection_class=_lease_bound(connection_class), **kwargs)


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

