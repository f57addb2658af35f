"""Request and response bodies of the API that aren't records of ``orchestrator.model.records``.

An operation in a request is checked by the very model the CLI builds (``Operation``), so
the API and the CLI accept and refuse exactly the same things.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.model.names import MAX_TARGETS, HostName, Name, Namespace, refuse_bad_text
from orchestrator.model.operation import PARAMS, Op, Operation, SubmitOptions
from orchestrator.model.records import Job

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
    options: SubmitOptions | None = None

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
