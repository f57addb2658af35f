"""The root of the ``vmorch`` command: global options, error handling, exit codes.

Exit codes: 0 ok, 1 a job failed, 2 bad input, 3 not found.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from orchestrator.model.errors import InvalidInput, VmorchError
from orchestrator.model.names import check_namespace
from orchestrator.model.settings import Settings

from . import completion
from .context import State
from .lazy import lazy_group
from .render import error

#: every command, in the order '--help' lists them, and where it is defined ("module:attribute", a Typer
#: app for a group): a run imports and builds only the command it runs (start-up time)
COMMANDS = {
    "scheduler": "cli.schedules:scheduler",
    "up": "cli.cluster:up",
    "down": "cli.cluster:down",
    "worker": "cli.cluster:worker",
    "api": "cli.api:serve",
    "doctor": "cli.doctor:doctor",
    "vm": "cli.vmcommands:app",
    "job": "cli.jobs:app",
    "host": "cli.hosts:app",
    "image": "cli.images:app",
    "net": "cli.networks:app",
    "ns": "cli.namespaces:app",
    "experiment": "cli.experiments:app",
    "schedule": "cli.schedules:app",
    "token": "cli.tokens:app",
}

app = typer.Typer(
    name="vmorch",
    help="Distributed VM management: operations queued, ordered and locked across a cluster.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=lazy_group(COMMANDS),
)


@app.callback()
def root(
    ctx: typer.Context,
    redis_url: Annotated[str | None, typer.Option("--redis-url", envvar="VMORCH_REDIS_URL",
                                                  help="Redis of the cluster (default: the local cluster's)")] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", envvar="VMORCH_NAMESPACE",
                                           help="namespace of VMs and jobs",
                                           autocompletion=completion.namespace_names)] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")] = False,
    api_url: Annotated[str | None, typer.Option("--api-url", envvar="VMORCH_API_URL",
                                                help="talk to this vmorch API instead of Redis")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="VMORCH_TOKEN", show_default=False,
                                              help="API token (default: the file $VMORCH_HOME/token)")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", show_default=False,
        help="submit at most once: run again with the same key (after a timeout, say), a vm command prints "
             "the jobs of the first run and makes none (kept for a day)")] = None,
) -> None:
    overrides: dict[str, object] = {"namespace": check_namespace(namespace)}
    if redis_url:
        overrides["redis_url"] = redis_url
    if api_url:
        overrides["api_url"] = api_url
    if token:
        overrides["token"] = token
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"bad setting {first['loc'][0]}: {first['msg']}",
                           hint="check the VMORCH_* environment variables") from None
    if idempotency_key is not None and not (0 < len(idempotency_key) <= 200 and idempotency_key.isascii()
                                            and idempotency_key.isprintable() and " " not in idempotency_key):
        raise InvalidInput("bad --idempotency-key", hint="1 to 200 printable ASCII characters, no spaces")
    ctx.obj = State(settings=settings, json=as_json, idempotency_key=idempotency_key)


def main(argv: list[str] | None = None) -> None:
    """Entry point. typer reports usage errors itself (exit 2); vmorch's errors are one line and a hint."""
    as_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, prog_name="vmorch")
    except VmorchError as exc:
        error(exc, as_json=as_json)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
