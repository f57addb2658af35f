"""``/api/v1/jobs``: submit operations, read, wait for and cancel jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response

from orchestrator.edge.api.auth import Client, CurrentToken, authorize, visible_job
from orchestrator.edge.api.errors import responses, state_conflict
from orchestrator.edge.api.schemas import Namespace, Plan, PlanEntry, SubmitRequest
from orchestrator.model.errors import InvalidInput
from orchestrator.model.operation import SubmitOptions
from orchestrator.model.records import Job
from orchestrator.store.retention import PruneReport
from orchestrator.store.tokens import Role

router = APIRouter(prefix="/api/v1", tags=["jobs"])

JobId = Annotated[int, Path(ge=1, le=2**62, description="job id")]


def job_url(job_id: int) -> str:
    return f"/api/v1/jobs/{job_id}"


def idempotency_key(
        token: CurrentToken,
        key: Annotated[str | None, Header(
            alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[!-~]+$",
            description="a key of the client's choosing: submitting again with it (after a timeout, say) "
                        "returns the jobs of the first submit and makes none; remembered for a day")] = None,
) -> str | None:
    """The key, scoped to the token: one tenant's key never finds another's jobs."""
    return None if key is None else f"token/{token.name}/{key}"


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]


def with_key(options: SubmitOptions | None, key: str | None, token_name: str) -> SubmitOptions | None:
    """The submit options with the request's idempotency key (the header's, or the body's), scoped."""
    body_key = None if options is None or options.idempotency_key is None \
        else f"token/{token_name}/{options.idempotency_key}"
    if key is not None and body_key is not None and key != body_key:
        raise InvalidInput("the Idempotency-Key header and options.idempotency_key differ",
                           hint="send the key once, in either place")
    chosen = key or body_key
    if chosen is None:
        return options
    return (options or SubmitOptions()).model_copy(update={"idempotency_key": chosen})


def accepted(response: Response, jobs: list[Job]) -> list[Job]:
    if jobs:
        response.headers["Location"] = job_url(jobs[0].id)
    return jobs


@router.post("/jobs", status_code=202, response_model=list[Job], responses=responses(403, 404, 409, 503),
             summary="Submit operations (all or none)")
def submit(body: SubmitRequest, response: Response, client: Client, token: CurrentToken,
           key: IdempotencyKey) -> list[Job]:
    """Accept operations, each as a job in its VM's order; ``Location`` points to the first job.

    Needs role ``operate`` on every namespace of the batch.
    """
    ops = body.build()
    for ns in sorted({o.namespace for o in ops}):
        authorize(token, Role.OPERATE, ns)
    if body.options is not None:
        # a dependency in a namespace the token doesn't cover is as unknown as a missing job
        for dep in dict.fromkeys([*body.options.after, *body.options.after_final]):
            visible_job(client, token, dep)
        if body.options.retry_of is not None:
            visible_job(client, token, body.options.retry_of)
    return accepted(response, client.submit(ops, with_key(body.options, key, token.name)))


@router.post("/plan", response_model=Plan, responses=responses(403, 409, 503),
             summary="Where launches would go (changes nothing)")
def plan(body: SubmitRequest, client: Client, token: CurrentToken) -> Plan:
    """The dry run of ``vm launch``: only ``launch`` operations. Needs role ``operate``."""
    ops = body.build()
    for ns in sorted({o.namespace for o in ops}):
        authorize(token, Role.OPERATE, ns)
    not_launch = [i for i, o in enumerate(ops) if o.op.value != "launch"]
    if not_launch:
        raise InvalidInput(f"operations.{not_launch[0]}.op: only launches can be planned",
                           hint="send launch operations only")
    return Plan(plan=[PlanEntry(vm=vm, host=host) for vm, host in client.plan(ops).items()])


@router.post("/jobs/prune", response_model=PruneReport, responses=responses(403, 503),
             summary="Remove finished jobs older than the retention (or `older_than`), with their history")
def prune(client: Client, token: CurrentToken,
          namespace: Annotated[Namespace | None, Query(description="only this namespace's jobs")] = None,
          older_than: Annotated[float | None, Query(ge=0, le=100 * 365 * 86400,
                                                    description="seconds (default: VMORCH_JOB_RETENTION)")] = None,
          ) -> PruneReport:
    """Role ``admin`` on the namespace (without one: on every namespace). Jobs are archived first when the
    API's ``VMORCH_JOB_ARCHIVE_DIR`` is set. Never a job an unfinished job needs."""
    authorize(token, Role.ADMIN, namespace)
    return client.prune(namespace, older_than=older_than)


# Declared before /jobs/{job_id}: a path segment "wait" must not be read as a job id.
@router.get("/jobs/wait", response_model=list[Job], responses=responses(404, 503),
            summary="Long poll: answer once every job is final, or after `timeout` seconds")
def wait_many(client: Client, token: CurrentToken,
              ids: Annotated[list[int], Query(min_length=1, max_length=1000, description="job ids")],
              timeout: Annotated[float, Query(ge=0, le=300, description="seconds (capped by the server)")] = 30.0,
              ) -> list[Job]:
    """The jobs as they are when all are final or the timeout passed (check ``state``). Role ``read``."""
    for job_id in dict.fromkeys(ids):
        visible_job(client, token, job_id)
    return client.wait(ids, timeout=min(timeout, client.settings.api_wait_max))


@router.get("/jobs/{job_id}", response_model=Job, responses=responses(404, 503), summary="One job")
def get_job(job_id: JobId, client: Client, token: CurrentToken) -> Job:
    return visible_job(client, token, job_id)


@router.get("/jobs/{job_id}/wait", response_model=Job, responses=responses(404, 503),
            summary="Long poll: answer once the job is final, or after `timeout` seconds")
def wait_one(job_id: JobId, client: Client, token: CurrentToken,
             timeout: Annotated[float, Query(ge=0, le=300, description="seconds (capped by the server)")] = 30.0,
             ) -> Job:
    visible_job(client, token, job_id)
    [job] = client.wait([job_id], timeout=min(timeout, client.settings.api_wait_max))
    return job


@router.get("/jobs/{job_id}/children", response_model=list[Job], responses=responses(404, 503),
            summary="The children of a parent job (a bulk command's jobs), oldest first")
def children(job_id: JobId, client: Client, token: CurrentToken) -> list[Job]:
    visible_job(client, token, job_id)
    return client.children(job_id)


@router.post("/jobs/{job_id}/retry", status_code=202, response_model=list[Job], responses=responses(403, 404, 409, 503),
             summary="Run a failed job again; for a parent job, its failed children under a new parent")
def retry(job_id: JobId, response: Response, client: Client, token: CurrentToken) -> list[Job]:
    """Needs role ``operate``. ``Location`` points to the first new job (the new parent, if any). 409 for a job
    with nothing to retry: not final yet, succeeded, or a parent none of whose children failed."""
    job = visible_job(client, token, job_id)
    authorize(token, Role.OPERATE, job.namespace)
    with state_conflict():
        jobs = client.retry(job_id)
    first = jobs[0].parent if jobs and jobs[0].parent is not None else (jobs[0].id if jobs else None)
    if first is not None:
        response.headers["Location"] = job_url(first)
    return jobs


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Job, responses=responses(403, 404, 503),
             summary="Cancel a job: at once if not started, at its next step if running")
def cancel(job_id: JobId, response: Response, client: Client, token: CurrentToken) -> Job:
    """Needs role ``operate`` on the job's namespace."""
    job = visible_job(client, token, job_id)
    authorize(token, Role.OPERATE, job.namespace)
    response.headers["Location"] = job_url(job_id)
    return client.cancel(job_id)
