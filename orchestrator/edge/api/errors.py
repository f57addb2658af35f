"""vmorch's error tree as HTTP: one JSON body shape for every error, and the status of each error class.

Body: ``{"error": {"code", "message", "hint", "field"}}`` -- ``code`` is the ``VmorchError`` code,
so ``HttpClient`` raises the very class the ``RedisClient`` would have raised.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(422, InvalidInput.code, f"{field or 'request'}: {msg}{more}",
                          hint="see the API's OpenAPI document at /docs for valid values", field=field or None)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
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
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)
