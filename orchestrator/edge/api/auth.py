"""Who may do what: bearer tokens (authentication) and role x namespace checks (authorization).

The rule, the same on every route:

* no token, or an unknown or revoked one -> 401, before anything else is looked at;
* a namespace named in the request (its path, or an operation's ``namespace``) that the
  token doesn't cover -> 403, whether or not that namespace exists; so the answer says
  nothing about what is in it, its VMs included;
* a job asked for by id whose namespace the token doesn't cover -> 404, word for word the
  answer for a job that doesn't exist (ids are global: a 403 would confirm the job exists);
* a role below the route's -> 403.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPBearer
from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.edge.api.backend import Backend
from orchestrator.edge.api.errors import vmorch_error_response
from orchestrator.edge.api.schemas import Namespace
from orchestrator.model.errors import ClusterUnavailable, Forbidden, NotFound, Unauthorized, VmorchError
from orchestrator.model.records import Job
from orchestrator.services.client import RedisClient
from orchestrator.store.tokens import ALL, Role, Token, lookup_async

#: only documents the scheme in OpenAPI; the middleware below does the checking
bearer = HTTPBearer(auto_error=False, description="an API token made with 'vmorch token create'")

ANONYMOUS = Token(name="anonymous", role=Role.ADMIN, namespaces=[ALL])
PUBLIC_PATHS = frozenset({"/api/v1/health"})
TOKEN_HINT = "send 'Authorization: Bearer <token>'; an admin makes tokens with 'vmorch token create'"


def backend(request: Request) -> Backend:
    found = request.app.state.backend
    assert isinstance(found, Backend)
    return found


class TokenAuth:
    """ASGI middleware: every ``/api/v1`` request but the health check needs a valid token, checked first.

    A middleware rather than a dependency, so that a request without a token learns nothing,
    not even whether its body or parameters were valid. Plain ASGI and an async Redis
    client: it runs on every request, so it costs no thread hop and no extra task.
    """

    def __init__(self, app: ASGIApp, backend: Backend) -> None:
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/api/v1/") or path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            token = await self._token(Headers(scope=scope).get("authorization", ""))
        except VmorchError as exc:
            await vmorch_error_response(exc)(scope, receive, send)
            return
        except RedisError as exc:  # raised here, it would skip the app's handlers and end as a 500
            down = ClusterUnavailable(f"cannot reach Redis: {exc}", hint="the API's Redis is down or restarting; "
                                                                         "try again")
            await vmorch_error_response(down)(scope, receive, send)
            return
        scope.setdefault("state", {})["token"] = token  # request.state.token
        await self.app(scope, receive, send)

    async def _token(self, authorization: str) -> Token:
        if not self.backend.settings.api_auth:
            return ANONYMOUS
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("missing API token", hint=TOKEN_HINT)
        token = await lookup_async(self.backend.async_redis(), secret.strip())
        if token is None:
            raise Unauthorized("unknown or revoked API token", hint=TOKEN_HINT)
        return token


def current_token(request: Request) -> Token:
    token = getattr(request.state, "token", None)
    if not isinstance(token, Token):  # only if a route outside /api/v1 asked for it
        raise Unauthorized("missing API token", hint=TOKEN_HINT)
    return token


CurrentToken = Annotated[Token, Depends(current_token)]


def client(request: Request, token: CurrentToken) -> RedisClient:
    """The shared client, recording the token's name as who asked (the history's ``by``)."""
    return backend(request).client().acting_as(f"token:{token.name}")


Client = Annotated[RedisClient, Depends(client)]


def authorize(token: Token, role: Role, namespace: str | None) -> None:
    """Raise Forbidden unless ``token`` may act as ``role`` on ``namespace`` (None: the whole cluster)."""
    if namespace is not None and not token.covers(namespace):
        raise Forbidden(f"token {token.name!r} has no access to namespace {namespace!r}",
                        hint="use a token made for that namespace ('vmorch token create --namespace NS')")
    if namespace is None and not token.all_namespaces:
        raise Forbidden(f"token {token.name!r} is limited to namespaces {', '.join(token.namespaces)}; "
                        "this request concerns the whole cluster", hint="use a token made with --namespace '*'")
    if not token.role.covers(role):
        raise Forbidden(f"token {token.name!r} has role {token.role.value}; this request needs {role.value}",
                        hint=f"use a token with role {role.value} or above")


def namespace_access(role: Role) -> Callable[..., str]:
    """A dependency giving the path's namespace once the token may act on it as ``role``."""

    def check(ns: Annotated[Namespace, Path(description="namespace name")], token: CurrentToken) -> str:
        authorize(token, role, ns)
        return ns

    return check


ReadNs = Annotated[str, Depends(namespace_access(Role.READ))]
OperateNs = Annotated[str, Depends(namespace_access(Role.OPERATE))]
AdminNs = Annotated[str, Depends(namespace_access(Role.ADMIN))]


def visible_job(client: RedisClient, token: Token, job_id: int) -> Job:
    """The job, or NotFound -- the same NotFound for a job of a namespace the token doesn't cover."""
    try:
        job = client.job(job_id)
    except NotFound:
        job = None
    if job is None or not token.covers(job.namespace):
        raise NotFound(f"no job {job_id}", hint="list jobs with 'vmorch job list'")
    return job
