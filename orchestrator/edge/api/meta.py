"""``/api/v1/health`` (no token needed) and ``/api/v1/whoami``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from orchestrator.edge.api.auth import CurrentToken, backend
from orchestrator.edge.api.errors import responses
from orchestrator.edge.api.schemas import Health
from orchestrator.store.tokens import Token

router = APIRouter(prefix="/api/v1", tags=["meta"])
#: routes without a token (auth.PUBLIC_PATHS): included without the bearer scheme, so OpenAPI shows no lock
public = APIRouter(prefix="/api/v1", tags=["meta"])


@public.get("/health", response_model=Health, responses={503: responses(503)[503]},
            summary="Whether the API reaches Redis (no token needed)")
def health(request: Request) -> Health:
    backend(request).client().redis.ping()
    return Health(status="ok")


@router.get("/whoami", response_model=Token, responses=responses(), summary="The token of this request")
def whoami(token: CurrentToken) -> Token:
    return token
