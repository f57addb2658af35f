"""``/api/v1/namespaces/{ns}/vms/{name}/console``: a VM's serial console over HTTP.

Reading needs the namespace's read role; typing (the writer lease and input) its operate role.
``GET .../console/ws`` is the same console over one WebSocket, for the dashboard (``consolesocket``);
it is on a router of its own, ``socket``, because it authenticates its first message itself
(``auth.TokenAuth`` and the routes' HTTP dependencies see HTTP requests only).
``vm exec`` and ``vm cp`` are ordinary operations (``POST .../vms/{target}/exec``, ``.../cp``).
A read with ``block_ms`` is a long poll: it returns as soon as there is output.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, WebSocket
from pydantic import BaseModel, Field, WithJsonSchema

from orchestrator.edge.api.auth import Client, OperateNs, ReadNs
from orchestrator.edge.api.backend import Backend
from orchestrator.edge.api.consolesocket import ConsoleSocket
from orchestrator.edge.api.errors import responses
from orchestrator.edge.api.schemas import Name
from orchestrator.services.console import RedisConsole
from orchestrator.store.console import BLOCK_MAX_MS, READ_MAX, ConsoleChunk

router = APIRouter(prefix="/api/v1/namespaces/{ns}/vms/{name}/console", tags=["console"])
socket = APIRouter(prefix=router.prefix)

VmName = Annotated[Name, Path(description="VM name")]
#: a stream entry id ("0": from the start, "$": only what comes next)
EntryId = Annotated[str, Query(pattern=r"^(0|\$|\d{1,20}-\d{1,20})$", description="read after this entry")]


class ConsoleOutput(ConsoleChunk):
    """``ConsoleChunk`` as documented: an entry, ``[id, text]``, is written as two strings without
    ``prefixItems``, which schemathesis 4 misreads in a response (schemathesis issues 3842, 4099)."""

    entries: list[Annotated[tuple[str, str], WithJsonSchema(
        {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2})]]


class Session(BaseModel):
    session: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class Input(Session):
    text: str = Field(min_length=1, max_length=64 * 1024)


class Claimed(BaseModel):
    writer: bool
    #: who holds the lease (a session id), if anyone
    holder: str | None = None


class Sent(BaseModel):
    sent: bool


@router.get("", response_model=ConsoleOutput, responses=responses(403, 404, 503),
            summary="The VM's console output after an entry (a long poll with block_ms)")
def read(ns: ReadNs, name: VmName, client: Client, after: EntryId = "0",
         count: Annotated[int, Query(ge=1, le=READ_MAX)] = READ_MAX,
         block_ms: Annotated[int, Query(ge=0, le=BLOCK_MAX_MS)] = 0) -> ConsoleChunk:
    return RedisConsole(client.store).read(ns, name, after=after, count=count, block_ms=block_ms)


@router.get("/tail", response_model=ConsoleOutput, responses=responses(403, 404, 503),
            summary="The entries holding the console's last lines")
def tail(ns: ReadNs, name: VmName, client: Client,
         lines: Annotated[int, Query(ge=0, le=100_000)] = 50) -> ConsoleChunk:
    return RedisConsole(client.store).tail(ns, name, lines=lines)


@router.put("/writer", response_model=Claimed, responses=responses(403, 404, 503),
            summary="Take (or renew) the console's writer lease: one writer at a time")
def claim(ns: OperateNs, name: VmName, client: Client, body: Annotated[Session, Body()]) -> Claimed:
    console = RedisConsole(client.store)
    got = console.claim(ns, name, body.session)
    return Claimed(writer=got, holder=None if got else console.writer(ns, name))


@router.get("/writer", response_model=Claimed, responses=responses(403, 503), summary="Who holds the writer lease")
def holder(ns: ReadNs, name: VmName, client: Client) -> Claimed:
    return Claimed(writer=False, holder=RedisConsole(client.store).writer(ns, name))


@router.delete("/writer", status_code=204, responses=responses(403, 503), summary="Give the writer lease back")
def release(ns: OperateNs, name: VmName, client: Client,
            session: Annotated[str, Query(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]) -> None:
    RedisConsole(client.store).release(ns, name, session)


@router.post("/input", response_model=Sent, responses=responses(403, 503),
             summary="Type on the console (refused unless the session holds the writer lease)")
def send(ns: OperateNs, name: VmName, client: Client, body: Annotated[Input, Body()]) -> Sent:
    return Sent(sent=RedisConsole(client.store).send(ns, name, body.session, body.text))


@socket.websocket("/ws")
async def live(websocket: WebSocket, ns: str, name: str) -> None:
    """The console over a WebSocket; the names are checked after the token (``ConsoleSocket``), never by FastAPI,
    whose refusal would close the socket with a reason made of its validation errors."""
    backend = websocket.app.state.backend
    assert isinstance(backend, Backend)
    await ConsoleSocket(websocket, backend, ns, name).run()
