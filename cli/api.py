"""``vmorch api``: serve the HTTP API (uvicorn)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from orchestrator.model.errors import InvalidInput

from .context import LogFormat, state


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="port to listen on")] = 8700,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="accept requests without a token (loopback only)")
                       ] = False,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
    log_format: LogFormat = "text",
) -> None:
    """Serve the HTTP API: every request needs a token ('vmorch token create') unless --no-auth."""
    import uvicorn

    from orchestrator.edge.api import create_app
    from orchestrator.model import logs

    st = state(ctx)
    auth = st.settings.api_auth and not no_auth
    if not auth and not is_loopback(host):
        raise InvalidInput(f"refusing to serve without authentication on {host}",
                           hint="drop --no-auth (and VMORCH_API_AUTH=0), or listen on 127.0.0.1")
    logs.setup(log_format, loglevel)
    app = create_app(st.settings.model_copy(update={"api_auth": auth}))
    # Open event streams never end by themselves: give them a few seconds on shutdown, not forever.
    # log_config=None: uvicorn's own lines go through vmorch's format too
    uvicorn.run(app, host=host, port=port, log_level=loglevel.lower(), access_log=False, log_config=None,
                timeout_graceful_shutdown=5)
