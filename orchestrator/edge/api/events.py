"""``GET /api/v1/jobs/events``: server-sent events, one per job change, in the token's namespaces; and
``GET /api/v1/namespaces/{ns}/history``: a VM's, a job's or the namespace's history, with how much
older history was trimmed.

The event stream is async all the way (``redis.asyncio``): a stream holds a Redis connection but no
worker thread, so open dashboards can't starve the threads that serve ordinary requests. It is fed
by the update channel (``keys.UPDATES``), not by the namespace's history stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, cast

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from orchestrator.edge.api.auth import Client, CurrentToken, ReadNs, authorize, backend
from orchestrator.edge.api.errors import responses
from orchestrator.edge.api.schemas import Name, Namespace
from orchestrator.model.errors import ClusterUnavailable
from orchestrator.model.records import Job
from orchestrator.store import keys
from orchestrator.store.history import History
from orchestrator.store.tokens import Role

router = APIRouter(prefix="/api/v1", tags=["jobs"])

#: a comment line this often keeps proxies from closing an idle stream
KEEPALIVE_S = 15.0
#: open streams per API process; more get 503
MAX_STREAMS = 200


_STREAM: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-sent events, until the client goes",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@router.get("/jobs/events", response_class=StreamingResponse, responses={**_STREAM, **responses(403, 503)},
            summary="Server-sent events: every job change in the token's namespaces (or one of them)")
async def job_events(
    request: Request, token: CurrentToken,
    namespace: Annotated[Namespace | None, Query(description="only this namespace's jobs")] = None,
) -> StreamingResponse:
    """``text/event-stream``; each event is ``event: job``, ``id: <job id>``, ``data: <the job as JSON>``.

    Role ``read``. Sent as jobs change from the moment of connecting; read the current state
    with ``GET /api/v1/namespaces/{ns}/jobs`` first.
    """
    if namespace is not None:
        authorize(token, Role.READ, namespace)
    state = request.app.state
    if state.open_streams >= MAX_STREAMS:
        raise ClusterUnavailable(f"{MAX_STREAMS} event streams are open already", hint="try again later")
    redis = backend(request).async_redis()
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.UPDATES)

    def wanted(ns: str) -> bool:
        return ns == namespace if namespace is not None else token.covers(ns)

    async def stream() -> AsyncIterator[str]:
        state.open_streams += 1
        try:
            yield ": vmorch job events\n\n"
            idle = 0.0
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    idle += 1.0
                    if idle >= KEEPALIVE_S:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                    continue
                job_id = str(message["data"]).partition(" ")[0]
                data = cast(dict[str, str], await redis.hgetall(keys.job(int(job_id)))) if job_id.isdigit() else {}
                if data and wanted(data.get("namespace", "")):
                    idle = 0.0
                    yield f"id: {job_id}\nevent: job\ndata: {Job.from_hash(data).model_dump_json()}\n\n"
        finally:
            state.open_streams -= 1
            # The client went away: this task is being cancelled, and the clean-up must still happen.
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/namespaces/{ns}/history", response_model=History, responses=responses(403, 503), tags=["vms"],
            summary="A VM's or a job's history (or the namespace's), oldest first, and how much older went")
def history(
    ns: ReadNs, client: Client,
    vm: Annotated[Name | None, Query(description="this VM's history")] = None,
    job_id: Annotated[int | None, Query(ge=1, le=2**62, description="this job's history")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
) -> History:
    """The newest ``limit`` entries. ``trimmed`` counts the older ones no longer kept (each history has a
    size: ``orchestrator.store.keys``); ``GET .../events`` gives the same entries without it."""
    return client.history(ns, vm=vm, job_id=job_id, limit=limit)
