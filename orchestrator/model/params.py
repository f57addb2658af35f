"""The base of every operation's params model (``orchestrator.model.operation.PARAMS``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    # Built on first use (see records._Record): a command uses the params of one operation at most.
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
