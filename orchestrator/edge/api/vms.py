"""``/api/v1/namespaces/{ns}/vms``, ``.../jobs`` and ``.../events``: what lives in a namespace."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response

from orchestrator.control.locks import vm_lock
from orchestrator.edge.api.auth import Client, OperateNs, ReadNs
from orchestrator.edge.api.errors import at_field, responses
from orchestrator.edge.api.jobs import IdempotencyKey, accepted
from orchestrator.edge.api.schemas import Name, OperationIn, VmQueue, build_operations
from orchestrator.model.names import expand_target
from orchestrator.model.operation import Op, SubmitOptions
from orchestrator.model.records import Event, Job, JobState, Vm

router = APIRouter(prefix="/api/v1/namespaces/{ns}", tags=["vms"])


@router.get("/vms", response_model=list[Vm], responses=responses(403, 503), summary="The namespace's VMs")
def list_vms(ns: ReadNs, client: Client) -> list[Vm]:
    return client.vms(ns)


@router.get("/vms/{name}", response_model=Vm, responses=responses(403, 404, 503), summary="One VM")
def get_vm(ns: ReadNs, name: Annotated[Name, Path(description="VM name")], client: Client) -> Vm:
    return client.vm(ns, name)


@router.get("/vms/{name}/queue", response_model=VmQueue, responses=responses(403, 503),
            summary="A VM's unfinished jobs in the order they run, and who holds its lock")
def vm_queue(ns: ReadNs, name: Annotated[Name, Path(description="VM name")], client: Client) -> VmQueue:
    lock = vm_lock(ns, name).name
    return VmQueue(vm=name, lock=lock, holder=client.store.lock_holder(lock), jobs=client.store.vm_queue(ns, name))


@router.post("/vms/{target}/{op}", status_code=202, response_model=list[Job],
             responses=responses(403, 404, 409, 503), summary="One operation on a VM or a range such as web[1-3]")
def operate(ns: OperateNs, client: Client, response: Response, key: IdempotencyKey,
            target: Annotated[str, Path(max_length=200, description="a VM name or a range such as web[1-10]")],
            op: Annotated[Op, Path(description="the operation")],
            params: Annotated[dict[str, Any] | None, Body(description="the operation's parameters")] = None,
            ) -> list[Job]:
    """A job per VM of the target, all accepted or none; ``Location`` points to the first."""
    with at_field("path.target"):
        vms = expand_target(target)
    ops = build_operations([OperationIn(op=op, namespace=ns, vm=vm, params=params or {}) for vm in vms], ("body",),
                           indexed=False)
    return accepted(response, client.submit(ops, SubmitOptions(idempotency_key=key) if key else None))


@router.get("/jobs", response_model=list[Job], responses=responses(403, 503),
            summary="The namespace's jobs, newest first, filtered; paged with `before`")
def list_jobs(
    ns: ReadNs, client: Client, request: Request, response: Response,
    vm: Annotated[Name | None, Query(description="only this VM's jobs")] = None,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    op: Annotated[Op | None, Query(description="only this operation")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
    before: Annotated[int | None, Query(ge=1, le=2**62, description="only jobs with a smaller id (next page)")] = None,
) -> list[Job]:
    """A full page carries a ``Link: <...>; rel="next"`` header to the next one."""
    jobs = client.jobs(ns, vm=vm, state=state, op=op, limit=limit, before=before)
    if len(jobs) == limit:
        url = request.url.include_query_params(before=jobs[-1].id)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return jobs


@router.get("/events", response_model=list[Event], responses=responses(403, 503),
            summary="The namespace's history, oldest first (the newest `limit` entries)")
def list_events(
    ns: ReadNs, client: Client,
    vm: Annotated[Name | None, Query(description="only this VM's")] = None,
    job_id: Annotated[int | None, Query(ge=1, le=2**62, description="only this job's")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
) -> list[Event]:
    return client.events(ns, vm=vm, job_id=job_id, limit=limit)

