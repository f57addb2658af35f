"""Request and response bodies of the API that aren't records of ``orchestrator.model.records``.

An operation in a request is checked by the very model the CLI builds (``Operation``), so
the API and the CLI accept and refuse exactly the same things.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from orchestrator.model import names
from orchestrator.model.names import MAX_TARGETS, refuse_bad_text
from orchestrator.model.operation import PARAMS, Op, Operation, SubmitOptions
from orchestrator.model.records import Job, Quota


@dataclass(frozen=True)
class Documented:
    """A name validator's rule, written into the OpenAPI document (``pattern``, ``maxLength``).

    Documentation only: the validator of ``orchestrator.model.names`` stays the one check, with its
    own messages. Its regex is used as it is, anchored (the validators ``fullmatch``; JSON Schema's
    ``pattern`` searches), so the document and the check can't drift apart.
    """

    regex: re.Pattern[str]
    max_length: int | None = None

    def __get_pydantic_json_schema__(self, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core)
        schema["pattern"] = f"^(?:{self.regex.pattern})$"
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        return schema


# The names of the API, in paths, queries and bodies: names.py's validators, documented.
NAME_RULE = Documented(names._NAME, names.NAME_MAX)
Name = Annotated[names.Name, NAME_RULE]
HostName = Annotated[names.HostName, NAME_RULE]
Namespace = Annotated[names.Namespace, Documented(names._NAMESPACE)]


def strict_json(model: type[BaseModel]) -> BeforeValidator:
    """For a body (or part of one) of ``model``: its JSON types checked first, as the document reads them --
    ``false`` or ``"5"`` where it says integer is refused, where pydantic's lax mode would take 0 or 5.
    (``5.0`` is an integer to JSON Schema: it stays one.) Then the model validates as usual."""

    return BeforeValidator(lambda data: json_types_checked(model, data))


def json_types_checked(model: type[BaseModel], data: Any) -> Any:
    """``data``, once its JSON types are those ``model`` documents (a ``ValidationError`` if not)."""
    if isinstance(data, dict):  # anything else: the model's own validation refuses it
        model.__pydantic_validator__.validate_json(json.dumps(_integral(data)), strict=True)
    return data


def _integral(data: Any) -> Any:
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, dict):
        return {k: _integral(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_integral(v) for v in data]
    return data


_PARAMS_DOC = "; ".join(f"{op.value}: {', '.join(model.model_fields) or 'none'}" for op, model in PARAMS.items())


class OperationIn(BaseModel):
    """One operation on one VM. ``params`` depend on ``op`` and are checked against its model."""

    model_config = ConfigDict(extra="forbid")

    op: Op
    namespace: Namespace
    vm: Name
    params: dict[str, Any] = Field(default_factory=dict, description=f"by op -- {_PARAMS_DOC}")


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: accepted all together or, if one is refused, none of them
    operations: list[OperationIn] = Field(min_length=1, max_length=MAX_TARGETS)
    #: a parent job, dependencies (``after``), a delay: as ``vmorch vm ... --after``
    options: Annotated[SubmitOptions | None, strict_json(SubmitOptions)] = None

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        # a lone surrogate or a control character anywhere: a 422 at its field, not a 500 in the store
        return refuse_bad_text(data, cls.__name__)

    def build(self) -> list[Operation]:
        return build_operations(self.operations, ("body", "operations"))


def build_operations(ops: list[OperationIn], where: tuple[str | int, ...], *, indexed: bool = True,
                     ) -> list[Operation]:
    """The operations, or a 422 naming the first bad field (as FastAPI's own validation does).

    ``where`` is where they were in the request; ``indexed``: it held a list of them.
    """
    out = []
    for i, raw in enumerate(ops):
        try:
            out.append(Operation.model_validate(refuse_bad_text(raw.model_dump())))
        except ValidationError as exc:
            at = (*where, i) if indexed else where
            raise RequestValidationError([{**e, "loc": (*at, *e["loc"])} for e in exc.errors(include_url=False)],
                                         ) from None
    return out


class PlanEntry(BaseModel):
    vm: str
    host: str


class Plan(BaseModel):
    plan: list[PlanEntry]


class NamespaceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Namespace
    #: the hosts its VMs may be placed on; null or absent: every host
    hosts: list[HostName] | None = Field(default=None, max_length=1000)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        return refuse_bad_text(data, cls.__name__)


class QuotaIn(Quota):
    """The body of ``PUT .../quota``: a ``Quota`` whose JSON types are checked first (``strict_json``). A model
    of its own: FastAPI gives a body parameter an alias that ``Annotated`` metadata can't carry.
    Built at once (the record's validator is deferred for CLI start-up): FastAPI can't use a deferred
    model as a body."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=False)

    @model_validator(mode="before")
    @classmethod
    def _json_types(cls, data: Any) -> Any:
        return json_types_checked(Quota, data)


class NamespaceDeleted(BaseModel):
    namespace: str
    removed_keys: int


class Health(BaseModel):
    status: str


class VmQueue(BaseModel):
    """What a VM's jobs wait for: its lock, who holds it now, and its unfinished jobs in order."""

    vm: str
    #: the lock every job of the VM runs under (the worker takes it for the whole operation)
    lock: str
    #: the holder's lock id, "<owner>:<pid>:<random>" (a worker's owner is its host name); null if free
    holder: str | None
    #: in sequence order: the running job first if there is one, then those waiting behind it
    jobs: list[Job]
