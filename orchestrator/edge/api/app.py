"""The app factory: ``create_app(settings)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Security

from orchestrator.edge import clustermetrics, dashboard
from orchestrator.edge.api import errors, events, experiments, guest, hosts, images, jobs, meta, namespaces, vms
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
                              "but `/api/v1/health` needs `Authorization: Bearer <token>`.",
                  dependencies=[Security(bearer)])
    app.state.backend = backend
    app.state.open_streams = 0
    app.add_middleware(TokenAuth, backend=backend)
    errors.install(app)
    for module in (meta, events, jobs, vms, guest, namespaces, hosts, experiments, images):
        app.include_router(module.router)
    # Outside /api/v1, so without a token, as Prometheus scrapes by default: cluster-wide
    # aggregates only (hosts, operations, states), never a namespace's or a VM's name.
    app.mount("/metrics", clustermetrics.asgi_app(settings))
    dashboard.install(app)
    return app
