"""``vmorch token ...``: API tokens.

These commands talk to Redis directly, never through the API: whoever reaches Redis already
controls the cluster, so that is what it takes to make, list and revoke tokens (no token can
mint another one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.store.tokens import Role

from . import render
from .context import State, state

if TYPE_CHECKING:
    from rich.table import Table

    from orchestrator.store.jobstore import Store
    from orchestrator.store.tokens import Token, TokenStore

app = typer.Typer(help="API tokens (needs direct access to Redis).", no_args_is_help=True)


def _who() -> str:
    from orchestrator.services.client import who  # imported here: '--help' needs no client (start-up time)

    return who()


def _stores(st: State) -> tuple[TokenStore, Store]:
    # imported here: '--help' needs no Redis (start-up time)
    from orchestrator.store.jobstore import Store
    from orchestrator.store.redisconn import connect, ping
    from orchestrator.store.tokens import TokenStore

    url = st.settings.resolved_redis_url()
    redis = connect(url, retries=2)
    ping(redis, url)
    return TokenStore(redis), Store(redis)


@app.command()
def create(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="a name for the token (shown in the history)")],
    role: Annotated[Role, typer.Option("--role", help="read: look; operate: also submit and cancel jobs; "
                                                         "admin: also create/delete namespaces, drain hosts")
                    ] = Role.READ,
    namespaces: Annotated[list[str] | None, typer.Option(
        "--namespace", help="a namespace it covers, repeatable; '*' for all (default: -n's namespace)")] = None,
) -> None:
    """Make a token. Its secret is printed once: it is stored only as a hash."""

    st = state(ctx)
    tokens, store = _stores(st)
    secret, token = tokens.create(name, role, namespaces or [st.namespace])
    store.add_event(None, kind="token", vm=name, state="created", by=_who(),
                    detail=f"role {token.role.value}, namespaces {','.join(token.namespaces)}")
    if st.json:
        render.dump_json({**token.model_dump(mode="json"), "secret": secret})
        return
    render.out.print(secret)
    render.err.print(f"token {name!r} ({token.role.value} on {', '.join(token.namespaces)}): the line above is "
                     "its secret, shown only now. Use it as VMORCH_TOKEN=... with VMORCH_API_URL=..., "
                     "or 'Authorization: Bearer ...'.")


@app.command(name="list")
def list_(ctx: typer.Context) -> None:
    """List tokens (names, roles, namespaces; never secrets)."""
    st = state(ctx)
    tokens, _ = _stores(st)
    render.listing(tokens.list(), _table, as_json=st.json, empty="no tokens; make one with 'vmorch token create'")


@app.command()
def revoke(ctx: typer.Context, name: Annotated[str, typer.Argument(help="token name")]) -> None:
    """Revoke a token: requests with it are refused (401) from now on."""
    st = state(ctx)
    tokens, store = _stores(st)
    token = tokens.revoke(name)
    store.add_event(None, kind="token", vm=name, state="revoked", by=_who())
    if st.json:
        render.dump_json(token)
    else:
        render.out.print(f"token {name!r} revoked")


def _table(tokens: list[Token]) -> Table:
    table = render.new_table()
    for col in ("NAME", "ROLE", "NAMESPACES", "CREATED"):
        table.add_column(col, no_wrap=True)
    for t in tokens:
        table.add_row(t.name, t.role.value, ",".join(t.namespaces), render.when(t.created_at))
    return table
