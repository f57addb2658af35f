"""The web dashboard: static pages under ``/ui/`` that read and act through the HTTP API.

The pages carry no data and need no token; their script asks the API for everything with
the token the user pasted, so what a page shows is exactly what that token may see. Plain
files shipped as package data: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

PREFIX = "/ui"

# The pages hold a token in sessionStorage: nothing but their own files may run or be loaded,
# and no other site may frame them.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Pages(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Serve the dashboard at ``/ui/``; ``/`` redirects there."""

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/")

    app.mount(PREFIX, Pages(packages=[("orchestrator.edge.dashboard", "static")], html=True), name="dashboard")
