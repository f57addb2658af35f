"""The app factory: ``create_app(settings)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI, Security
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.edge import clustermetrics, dashboard
from orchestrator.edge.api import (
    errors,
    events,
    experiments,
    guest,
    hosts,
    images,
    jobs,
    meta,
    namespaces,
    networks,
    vms,
)
from orchestrator.edge.api.auth import TokenAuth, bearer
from orchestrator.edge.api.backend import Backend
from orchestrator.model.settings import Settings

API_VERSION = "1"
#: worker threads for the (synchronous) routes; anyio's default is 40
THREADS = 200


def create_app(settings: Settings) -> FastAPI:
    backend = Backend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Long polls hold a worker thread each for up to api_wait_max: room for many at once.
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield
        await backend.aclose()

    app = FastAPI(title="vmorch", version=API_VERSION, lifespan=lifespan,
                  description="VM operations queued, ordered and locked across a cluster. Every `/api/v1` route "
                              "but `/api/v1/health` needs `Authorization: Bearer <token>`.")
    app.state.backend = backend
    app.state.open_streams = 0
    app.add_middleware(TokenAuth, backend=backend)
    errors.install(app)
    strict_query = Depends(errors.no_unknown_query)
    app.include_router(meta.public, dependencies=[strict_query])
    for module in (meta, events, jobs, vms, guest, namespaces, hosts, experiments, images, networks):
        # documents the scheme on every route but the public ones (TokenAuth does the checking)
        app.include_router(module.router, dependencies=[Security(bearer), strict_query])
    app.include_router(guest.socket)  # a WebSocket: checks its first message's token itself (consolesocket)
    # Outside /api/v1, so without a token, as Prometheus scrapes by default: cluster-wide
    # aggregates only (hosts, operations, states), never a namespace's or a VM's name.
    # At /metrics and /metrics/ alike: no redirect from one to the other.
    metrics = clustermetrics.asgi_app(settings)
    app.router.routes.append(Route("/metrics", _Asgi(metrics), methods=["GET"], include_in_schema=False))
    app.mount("/metrics", metrics)
    dashboard.install(app)
    return app


class _Asgi:
    """An ASGI app as a route's endpoint (Starlette would call a plain function with a Request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
