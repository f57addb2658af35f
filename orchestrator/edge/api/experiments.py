"""Experiments and schedules over HTTP: ``/api/v1/namespaces/{ns}/experiments`` and ``.../schedules``.

An experiment file may name its own namespace; the token must cover that one too, so a file
can't carry a request into a namespace its token doesn't reach.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.edge.api.auth import Client, CurrentToken, OperateNs, ReadNs, authorize
from orchestrator.edge.api.errors import at_field, responses
from orchestrator.edge.api.schemas import Name
from orchestrator.model import experiment
from orchestrator.model.errors import NotFound
from orchestrator.model.operation import PARAMS, Op
from orchestrator.services.schedules import MAX_OPERATIONS, Schedule, ScheduleSpec
from orchestrator.store.runs import ExperimentRun
from orchestrator.store.tokens import Role

router = APIRouter(prefix="/api/v1/namespaces/{ns}", tags=["experiments"])

ScheduleName = Annotated[Name, Path(description="schedule name")]
#: an experiment file is small; this bounds what one request can make the API parse
MAX_EXPERIMENT_BYTES = 256 * 1024
_PARAMS_DOC = "; ".join(f"{op.value}: {', '.join(model.model_fields) or 'none'}" for op, model in PARAMS.items()
                        if op is not Op.MOVE_IN)


class ExperimentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the experiment file's YAML text
    text: str = Field(min_length=1, max_length=MAX_EXPERIMENT_BYTES)
    #: where it came from, for people (a path)
    source: str = Field(default="", max_length=500)


class ScheduledOpIn(BaseModel):
    """One operation over a target and/or tags, as ``vmorch vm OP TARGET --tag key=value`` makes it.

    Checked when the schedule is added; its VMs are resolved each time the schedule fires.
    """

    model_config = ConfigDict(extra="forbid")

    op: Op = Field(description="any op but move-in (a move is op move-out: both jobs are made from it)")
    target: str | None = Field(default=None, max_length=1000,
                               description="a VM name, a list a,b or a range web[1-10]; null: the VMs with `tag`")
    tag: dict[str, str] = Field(default_factory=dict, max_length=50, description="only VMs with all these tags")
    params: dict[str, Any] = Field(default_factory=dict, description=f"by op -- {_PARAMS_DOC}")


class ScheduleIn(BaseModel):
    """A schedule of the path's namespace: as ``ScheduleSpec`` without ``namespace``. It runs either
    ``experiment`` (an experiment file's text) or ``operations``, submitted as one batch at each firing."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    cron: str | None = Field(default=None, max_length=200)
    every: str | None = Field(default=None, max_length=50)
    at: str | None = Field(default=None, max_length=50, description="ISO 8601 time of a single firing")
    experiment: str | None = Field(default=None, max_length=MAX_EXPERIMENT_BYTES)
    source: str = Field(default="", max_length=500)
    operations: list[ScheduledOpIn] | None = Field(default=None, min_length=1, max_length=MAX_OPERATIONS)
    missed: str = Field(default="once", pattern="^(once|skip)$")


def _experiment_namespace(text: str, field: str, token: CurrentToken) -> None:
    with at_field(field):
        exp = experiment.load(text)
    if exp.namespace is not None:
        authorize(token, Role.OPERATE, exp.namespace)


@router.post("/experiments", status_code=202, response_model=ExperimentRun, responses=responses(403, 404, 409, 503),
             summary="Run an experiment file as a job graph")
def run_experiment(ns: OperateNs, body: ExperimentIn, client: Client, token: CurrentToken,
                   response: Response) -> ExperimentRun:
    """Needs role ``operate`` (on the file's own ``namespace`` too, if it names one)."""
    _experiment_namespace(body.text, "body.text", token)
    run = client.run_experiment(body.text, namespace=ns, source=body.source)
    response.headers["Location"] = f"/api/v1/namespaces/{run.namespace}/experiments/{run.id}"
    return run


@router.get("/experiments", response_model=list[ExperimentRun], responses=responses(403, 503),
            summary="The namespace's experiment runs, newest first")
def list_runs(ns: ReadNs, client: Client,
              limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> list[ExperimentRun]:
    return client.experiment_runs(ns, limit=limit)


@router.get("/experiments/{run_id}", response_model=ExperimentRun, responses=responses(403, 404, 503),
            summary="One experiment run with its steps' jobs")
def get_run(ns: ReadNs, run_id: Annotated[int, Path(ge=1, le=2**62)], client: Client) -> ExperimentRun:
    run = client.experiment_run(run_id)
    if run.namespace != ns:  # the same answer as for a run that doesn't exist
        raise NotFound(f"no experiment run {run_id} in namespace {ns!r}", hint="see 'vmorch experiment list'")
    return run


@router.post("/schedules", status_code=201, response_model=Schedule, responses=responses(403, 409, 503),
             summary="Add a schedule (cron, every or at; an experiment or operations)")
def add_schedule(ns: OperateNs, body: ScheduleIn, client: Client, token: CurrentToken,
                 response: Response) -> Schedule:
    """Needs role ``operate``; an experiment naming another namespace needs it there too."""
    if body.experiment is not None:
        _experiment_namespace(body.experiment, "body.experiment", token)
    try:
        spec = ScheduleSpec.model_validate({**body.model_dump(), "namespace": ns})
    except ValidationError as exc:  # what the body's own schema lets through: a bad time, or two of cron/every/at
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)],
                                     ) from None
    schedule = client.add_schedule(spec)
    response.headers["Location"] = f"/api/v1/namespaces/{ns}/schedules/{schedule.name}"
    return schedule


@router.get("/schedules", response_model=list[Schedule], responses=responses(403, 503),
            summary="The namespace's schedules with their next firing")
def list_schedules(ns: ReadNs, client: Client) -> list[Schedule]:
    return client.schedules(ns)


@router.get("/schedules/{name}", response_model=Schedule, responses=responses(403, 404, 503),
            summary="One schedule with its last firings")
def get_schedule(ns: ReadNs, name: ScheduleName, client: Client,
                 history: Annotated[int, Query(ge=0, le=1000)] = 10) -> Schedule:
    return client.schedule(ns, name, history=history)


@router.post("/schedules/{name}/pause", response_model=Schedule, responses=responses(403, 404, 503),
             summary="Pause a schedule (it fires no more until resumed)")
def pause_schedule(ns: OperateNs, name: ScheduleName, client: Client) -> Schedule:
    return client.pause_schedule(ns, name, True)


@router.post("/schedules/{name}/resume", response_model=Schedule, responses=responses(403, 404, 503),
             summary="Resume a paused schedule")
def resume_schedule(ns: OperateNs, name: ScheduleName, client: Client) -> Schedule:
    return client.pause_schedule(ns, name, False)


@router.delete("/schedules/{name}", status_code=204, responses=responses(403, 404, 503),
               summary="Remove a schedule")
def remove_schedule(ns: OperateNs, name: ScheduleName, client: Client) -> Response:
    client.remove_schedule(ns, name)
    return Response(status_code=204)
