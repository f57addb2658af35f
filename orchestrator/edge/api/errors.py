"""vmorch's error tree as HTTP: one JSON body shape for every error, and the status of each error class.

Body: ``{"error": {"code", "message", "hint", "field"}}`` -- ``code`` is the ``VmorchError`` code,
so ``HttpClient`` raises the very class the ``RedisClient`` would have raised.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from orchestrator.model.errors import (
    AlreadyExists,
    ClusterUnavailable,
    ExecError,
    Forbidden,
    InvalidInput,
    LockTimeout,
    NoCapacity,
    NotFound,
    RequestError,
    Unauthorized,
    VmorchError,
)

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    hint: str | None = None
    #: the request field at fault, for invalid input (``body.operations.0.memory_mib``)
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# Most specific first: the first class an error is an instance of decides.
STATUS: list[tuple[type[VmorchError], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (AlreadyExists, 409),
    (NoCapacity, 409),
    (InvalidInput, 422),
    (ClusterUnavailable, 503),
    (RequestError, 400),
    (LockTimeout, 503),
    (ExecError, 409),
]

_DESCRIPTIONS = {
    400: "The request was refused before anything changed.",
    401: "No API token, or an unknown or revoked one (send 'Authorization: Bearer <token>').",
    403: "The token's role or namespaces don't cover this request.",
    404: "No such VM, job, host or namespace (a job outside the token's namespaces is not found either).",
    409: "Conflicts with the cluster's state: the name exists, no host has room, or the namespace still has VMs.",
    422: "Invalid input: the body says which field and why. Nothing was accepted.",
    503: "The cluster can't be reached (Redis down) or is busy; try again.",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error statuses a route can answer (401 and 422 always)."""
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in sorted({401, 422, *codes})}


class Refusal(Exception):
    """A vmorch error answered with what only the route knows: the field at fault (``path.target``), or a
    status (409: it is the resource's state that refuses, not the request). Same code, message and hint."""

    def __init__(self, error: VmorchError, *, status: int | None = None, field: str | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status or status_of(error)
        self.field = field


@contextmanager
def at_field(field: str) -> Iterator[None]:
    """``InvalidInput`` raised inside is answered as a 422 whose ``field`` is ``field``."""
    try:
        yield
    except InvalidInput as exc:
        raise Refusal(exc, field=field) from None


@contextmanager
def state_conflict() -> Iterator[None]:
    """``InvalidInput`` raised inside is about the target's state (a job with nothing to retry): a 409."""
    try:
        yield
    except InvalidInput as exc:
        raise Refusal(exc, status=409) from None


def status_of(exc: VmorchError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(status: int, code: str, message: str, *, hint: str | None = None, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, hint=hint, field=field))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def vmorch_error_response(exc: VmorchError) -> JSONResponse:
    status = status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status >= 500:
        log.error("answering %s to a vmorch error: %s", status, exc.message)
    return error_response(status, exc.code, exc.message, hint=exc.hint, headers=headers)


async def _vmorch(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, VmorchError)
    return vmorch_error_response(exc)


_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _documented_paths(app: FastAPI) -> list[tuple[re.Pattern[str], int, frozenset[str]]]:
    """The OpenAPI document's paths: each as a regex over a request's path, its parameter count, its methods."""
    paths: list[tuple[re.Pattern[str], int, frozenset[str]]] | None = getattr(app.state, "documented_paths", None)
    if paths is None:
        paths = []
        for template, item in app.openapi()["paths"].items():
            parts = re.split(r"(\{[^}]*\})", template)
            regex = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
            paths.append((re.compile(regex), len(parts) // 2, frozenset(m.upper() for m in item if m in _METHODS)))
        app.state.documented_paths = paths
    return paths


def _resource(request: Request) -> tuple[int, list[str]] | None:
    """The resource the request's path names, as documented: of the paths that take it, those with the fewest
    parameters (``.../vms/web1/queue`` is ``GET .../vms/{name}/queue``, though ``POST .../vms/{target}/{op}``
    takes it too), as their parameter count and methods; None for a path the document doesn't have."""
    found = [(n, methods) for regex, n, methods in _documented_paths(request.app)
             if regex.fullmatch(request.scope["path"])]
    if not found:
        return None
    fewest = min(n for n, _ in found)
    return fewest, sorted({m for n, methods in found if n == fewest for m in methods})


def allowed_methods(request: Request) -> list[str]:
    """The methods of the resource the request's path names: the ``Allow`` of a 405."""
    resource = _resource(request)
    return resource[1] if resource else []


def _method_not_allowed(request: Request, allow: list[str]) -> JSONResponse:
    return error_response(405, "method_not_allowed", f"{request.method} {request.url.path}: Method Not Allowed",
                          hint=f"this path takes {', '.join(allow)}; the API's routes and methods are listed at /docs",
                          headers={"Allow": ", ".join(allow)})


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("loc", ())[:1] == ("path",) for e in errors):
        resource = _resource(request)
        if resource is not None and len(request.path_params) > resource[0] and request.method not in resource[1]:
            # POST .../vms/web1/queue reached POST .../vms/{target}/{op}, whose op it isn't: the path is
            # another resource's, which doesn't take the method
            return _method_not_allowed(request, resource[1])
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(422, InvalidInput.code, f"{field or 'request'}: {msg}{more}",
                          hint="see the API's OpenAPI document at /docs for valid values", field=field or None)


async def _refusal(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refusal)
    return error_response(exc.status, exc.error.code, exc.error.message, hint=exc.error.hint, field=exc.field)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:  # Starlette's Allow names one route's methods: the path may have several
        given = (getattr(exc, "headers", None) or {}).get("Allow", "")
        return _method_not_allowed(request, allowed_methods(request) or [m.strip() for m in given.split(",")])
    if exc.status_code == 400:
        # FastAPI's, for a body it can't even decode (not UTF-8, nested too deep): invalid input like any
        # other body that isn't JSON (which FastAPI already refuses with a 422)
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        return error_response(422, InvalidInput.code, f"body: not readable as JSON{cause}"[:300],
                              hint="send a UTF-8 JSON body (Content-Type: application/json)", field="body")
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
    return error_response(exc.status_code, codes.get(exc.status_code, "bad_request"),
                          f"{request.method} {request.url.path}: {exc.detail}",
                          hint="the API's routes and methods are listed at /docs",
                          headers=getattr(exc, "headers", None))


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, ClusterUnavailable.code, f"cannot reach Redis: {exc}",
                          hint="the API's Redis is down or restarting; try again")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; it was logged",
                          hint="see the API's log; please report it")


def install(app: FastAPI) -> None:
    app.add_exception_handler(VmorchError, _vmorch)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Refusal, _refusal)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)


def no_unknown_query(request: Request) -> None:
    """Refuse a query parameter the route does not take (422 naming it), as a body field it doesn't
    take is refused: ``?forse=true`` is a typo to report, not an option to ignore."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    resource = _resource(request)
    if resource is not None and len(request.path_params) > resource[0] and request.method not in resource[1]:
        return  # the path is another resource's, which doesn't take the method: a 405 (``_validation``)
    known = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise Refusal(InvalidInput(f"unknown query parameter {unknown[0]!r}",
                                   hint=f"this route takes: {', '.join(sorted(known)) or 'no query parameters'}"),
                      field=f"query.{unknown[0]}")


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
