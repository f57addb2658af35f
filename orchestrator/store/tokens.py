"""API tokens: random secrets shown once, kept in Redis only as their SHA-256.

A token has a name (unique), a role and the namespaces it covers (``*`` = all of them):

* ``read``    -- read VMs, jobs, events of its namespaces; hosts.
* ``operate`` -- also submit and cancel jobs in its namespaces.
* ``admin``   -- also create and delete its namespaces; with ``*``: drain hosts.

A secret is 32 random bytes (``vmo_`` + URL-safe base64), so a plain SHA-256 is enough: there
is nothing to brute-force, and a fast hash keeps every request's lookup to one ``HGETALL``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, cast

from pydantic import BaseModel, ConfigDict, field_serializer

from orchestrator.model.errors import AlreadyExists, InvalidInput, NotFound
from orchestrator.model.names import check_name, check_namespace
from orchestrator.model.records import ts
from orchestrator.store import keys

if TYPE_CHECKING:  # the CLI's '--help' reads Role without importing redis (start-up time)
    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis

SECRET_PREFIX = "vmo_"
ALL = "*"


class Role(StrEnum):
    READ = "read"
    OPERATE = "operate"
    ADMIN = "admin"

    def covers(self, wanted: Role) -> bool:
        return _RANK[self] >= _RANK[wanted]


_RANK = {Role.READ: 0, Role.OPERATE: 1, Role.ADMIN: 2}


class Token(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    name: str
    role: Role
    #: the namespaces it covers; ``["*"]`` is every namespace, present and future
    namespaces: list[str]
    created_at: datetime | None = None

    @field_serializer("created_at", when_used="json")
    def _iso(self, value: datetime | None) -> str | None:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None

    @property
    def all_namespaces(self) -> bool:
        return ALL in self.namespaces

    def covers(self, namespace: str) -> bool:
        return self.all_namespaces or namespace in self.namespaces

    def allows(self, role: Role, namespace: str | None = None) -> bool:
        """Whether this token may act with ``role`` on ``namespace`` (None: cluster-wide, needs ``*``)."""
        where = self.all_namespaces if namespace is None else self.covers(namespace)
        return where and self.role.covers(role)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_namespaces(namespaces: list[str]) -> list[str]:
    if not namespaces:
        raise InvalidInput("a token needs at least one namespace", hint="pass --namespace NAME, or '*' for all")
    if ALL in namespaces:
        return [ALL]
    return sorted({check_namespace(n) for n in namespaces})


class TokenStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def create(self, name: str, role: Role, namespaces: list[str]) -> tuple[str, Token]:
        """A new token; returns its secret (shown once, never stored) and its record."""
        check_name(name, "token name")
        namespaces = check_namespaces(namespaces)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        hashed = digest(secret)
        sec, usec = self.redis.time()
        created = f"{sec}.{usec:06d}"
        # HSETNX on the name index makes "name taken" and "token created" one decision.
        if not self.redis.hsetnx(keys.TOKENS, name, hashed):
            raise AlreadyExists(f"token {name!r} already exists", hint="pick another name, or revoke it first")
        self.redis.hset(keys.token(hashed), mapping={"name": name, "role": role.value,
                                                     "namespaces": json.dumps(namespaces), "created_at": created})
        return secret, Token(name=name, role=role, namespaces=namespaces, created_at=ts(created))

    def lookup(self, secret: str) -> Token | None:
        """The token of a presented secret, or None (unknown, revoked or malformed)."""
        if not well_formed(secret):
            return None
        data = cast(dict[str, str], self.redis.hgetall(keys.token(digest(secret))))
        return _token(data) if data else None

    def list(self) -> list[Token]:
        hashes = cast(dict[str, str], self.redis.hgetall(keys.TOKENS))
        pipe = self.redis.pipeline(transaction=False)
        for hashed in hashes.values():
            pipe.hgetall(keys.token(hashed))
        found = [_token(d) for d in pipe.execute() if d]
        return sorted(found, key=lambda t: t.name)

    def revoke(self, name: str) -> Token:
        hashed = cast(str | None, self.redis.hget(keys.TOKENS, name))
        data = cast(dict[str, str], self.redis.hgetall(keys.token(hashed))) if hashed else {}
        if not hashed or not data:
            raise NotFound(f"no token {name!r}", hint="see 'vmorch token list'")
        pipe = self.redis.pipeline()
        pipe.delete(keys.token(hashed))
        pipe.hdel(keys.TOKENS, name)
        pipe.execute()
        return _token(data)


async def lookup_async(redis: AsyncRedis, secret: str) -> Token | None:
    """``TokenStore.lookup`` for the API's event loop (a lookup on every request, without a thread)."""
    if not well_formed(secret):
        return None
    data = cast(dict[str, str], await redis.hgetall(keys.token(digest(secret))))
    return _token(data) if data else None


def well_formed(secret: str) -> bool:
    return secret.startswith(SECRET_PREFIX) and len(secret) <= 200


def _token(data: dict[str, str]) -> Token:
    return Token(name=data["name"], role=Role(data["role"]), namespaces=json.loads(data["namespaces"]),
                 created_at=ts(data.get("created_at")))
