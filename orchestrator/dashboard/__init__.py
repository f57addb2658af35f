"""The web dashboard: static pages under ``/ui/`` that read and act through the HTTP API.

The pages carry no data and need no token; their script asks the API for everything with
the token the user pasted, so what a page shows is exactly what that token may see. Plain
files shipped as package data: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

PREFIX = "/ui"


def install(app: FastAPI) -> None:
    """Serve the dashboard at ``/ui/``; ``/`` redirects there."""

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/")

    app.mount(PREFIX, StaticFiles(packages=[("orchestrator.dashboard", "static")], html=True), name="dashboard")
