"""What every command gets: the settings made from the global options, and the client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.model.settings import Settings

if TYPE_CHECKING:
    from orchestrator.services.client import Client


@dataclass
class State:
    settings: Settings
    json: bool = False
    #: ``--idempotency-key``: the submit of this command is made at most once
    idempotency_key: str | None = None
    _client: Client | None = field(default=None, repr=False)

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    @property
    def client(self) -> Client:
        """Over HTTP when an API URL is given (``--api-url``/``VMORCH_API_URL``), else straight to Redis."""
        if self._client is None:
            # imported here: '--help' and usage errors need no client libraries (start-up time)
            if self.settings.api_url:
                from orchestrator.edge.httpclient import HttpClient

                self._client = HttpClient(self.settings)
            else:
                from orchestrator.services.client import RedisClient

                self._client = RedisClient(self.settings)
        return self._client


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


#: ``--log-format`` of the long-running commands (worker, api, scheduler)
LogFormat = Annotated[str, typer.Option("--log-format", envvar="VMORCH_LOG_FORMAT",
                                        help="text, or json: one JSON object per line")]
