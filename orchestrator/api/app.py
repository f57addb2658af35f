"""The app factory: ``create_app(settings)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Security

from .. import dashboard
from ..settings import Settings
from . import errors, hosts, jobs, meta, namespaces, vms
from .auth import authenticate, bearer
from .backend import Backend

API_VERSION = "1"


def create_app(settings: Settings) -> FastAPI:
    backend = Backend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        backend.close()

    app = FastAPI(title="vmorch", version=API_VERSION, lifespan=lifespan,
                  description="VM operations queued, ordered and locked across a cluster. Every `/api/v1` route "
                              "but `/api/v1/health` needs `Authorization: Bearer <token>`.",
                  dependencies=[Security(bearer)])
    app.state.backend = backend
    app.middleware("http")(authenticate)
    errors.install(app)
    for module in (meta, jobs, vms, namespaces, hosts):
        app.include_router(module.router)
    dashboard.install(app)
    return app
