"""A VM's serial console over one WebSocket: ``GET /api/v1/namespaces/{ns}/vms/{name}/console/ws``.

What the dashboard's console view uses; the same stream, writer lease and input list as ``vm console``
(``orchestrator.store.console``), so a browser and a terminal share the one-writer rule.

The protocol, JSON text messages both ways:

* client, first (within ``HELLO_TIMEOUT_S``): ``{"token": "vmo_…", "read_only": false, "lines": 200}``.
  The token travels inside the socket: a browser can't put an ``Authorization`` header on a
  WebSocket, and a URL's query string ends up in proxies' and servers' access logs.
* server: ``{"type": "ready", "writer": bool, "holder": str | null, "why": str | null}`` (``why``: why
  the session is read-only), then ``{"type": "output", "data": "…"}``: the last ``lines`` lines, then
  what the guest prints, as it comes.
* client: ``{"type": "input", "data": "…"}`` (typed keys; dropped unless the session holds the writer
  lease), ``{"type": "claim"}`` (take the lease if it is free), ``{"type": "release"}``.
* server: ``{"type": "mode", …}`` (the fields of ``ready``) whenever the session's writer state changes,
  and in answer to input it dropped.
* a refusal: ``{"type": "error", "error": {"code", "message", "hint"}}``, then a close whose code is
  4000 + the HTTP status the API would answer (4401 no or bad token, 4403 namespace or role not covered,
  4404 no such VM, 4422 bad input, 4503 Redis unreachable), with the message as its reason.

Watching needs the namespace's read role, typing its operate role. A writer's lease is renewed while
the socket is open and given back when it closes; a socket that vanishes leaves it to expire. The
token is looked up again as often: revoking it closes its sockets (4401).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Callable, MutableMapping
from typing import Any, Literal, TypeVar, cast

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from orchestrator.edge.api.auth import ANONYMOUS, TOKEN_HINT, authorize
from orchestrator.edge.api.backend import Backend
from orchestrator.edge.api.errors import status_of
from orchestrator.edge.api.events import MAX_STREAMS
from orchestrator.model.errors import ClusterUnavailable, InvalidInput, Unauthorized, VmorchError
from orchestrator.model.names import check_name, check_namespace
from orchestrator.services.console import RedisConsole
from orchestrator.store import keys
from orchestrator.store.console import READ_MAX
from orchestrator.store.tokens import Role, Token, lookup_async

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
#: the writer lease lives ``keys.CONSOLE_WRITER_TTL_MS``; renewed this often while the socket is open,
#: and the token looked up again (a revoked token's sockets close within this)
RENEW_S = 3.0
#: one XREAD waits this long for output (then again): bounded, so a dead Redis is noticed
BLOCK_MS = 5_000
INPUT_MAX = 64 * 1024
#: a message longer than this is refused before it is parsed (the most ``INPUT_MAX`` characters take in JSON)
MESSAGE_MAX = 6 * INPUT_MAX + 1024
#: a close frame's reason is at most 123 bytes
REASON_MAX = 123
HELLO_HINT = ('send {"token": "vmo_…"} as the first message; '
              + TOKEN_HINT.removeprefix("send 'Authorization: Bearer <token>'; "))

T = TypeVar("T")


class Hello(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    token: str | None = Field(default=None, max_length=200)
    #: watch only, even if the token may type
    read_only: bool = False
    #: how many of the console's last lines to send first
    lines: int = Field(default=200, ge=0, le=10_000)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["input", "claim", "release"]
    data: str = Field(default="", max_length=INPUT_MAX)


def close_code(exc: VmorchError) -> int:
    return 4000 + status_of(exc)


def reason(text: str) -> str:
    return text.encode()[:REASON_MAX].decode(errors="ignore")


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid"))
    return f"{field}: {msg}" if field else msg


def _parse(model: type[BaseModel], message: MutableMapping[str, Any], what: str) -> Any:
    text = message.get("text")
    if text is None:
        raise InvalidInput(f"{what}: a binary message", hint="send JSON text messages")
    if len(text) > MESSAGE_MAX:
        raise InvalidInput(f"{what}: longer than {MESSAGE_MAX} characters", hint=f"send at most {INPUT_MAX} at once")
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidInput(f"{what}: {_first_error(exc)}",
                           hint="see the protocol in orchestrator/edge/api/consolesocket.py") from None


class ConsoleSocket:
    """One open console socket: authenticate its first message, then relay output out and keys in."""

    def __init__(self, ws: WebSocket, backend: Backend, namespace: str, vm: str) -> None:
        self.ws = ws
        self.backend = backend
        self.namespace = namespace
        self.vm = vm
        self.session = ""
        self._secret: str | None = None
        self.token = ANONYMOUS
        self.writer = False
        #: who holds the writer lease, when it is someone else (as last seen)
        self.holder: str | None = None
        self.why: str | None = None
        self._send_lock = anyio.Lock()

    async def run(self) -> None:
        state = self.ws.app.state
        await self.ws.accept()
        state.open_streams += 1
        try:
            await self._serve()
        except (WebSocketDisconnect, WebSocketDisconnected):
            pass
        except VmorchError as exc:
            await self._refuse(exc)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            await self._refuse(ClusterUnavailable(f"cannot reach Redis: {exc}",
                                                  hint="the API's Redis is down or restarting; try again"))
        except Exception:
            log.exception("unexpected error on the console socket of %s/%s", self.namespace, self.vm)
            await self._close(1011, "internal error; it was logged")
        finally:
            state.open_streams -= 1
            # The client went away: this task may be cancelled, and the lease must still go back.
            with anyio.CancelScope(shield=True):
                await self._release()

    # -- the session -----------------------------------------------------------------------

    async def _serve(self) -> None:
        hello = await self._hello()
        if self.ws.app.state.open_streams > MAX_STREAMS:
            raise ClusterUnavailable(f"{MAX_STREAMS} streams are open already", hint="try again later")
        if self.ws.query_params:
            raise InvalidInput("this route takes no query parameters", hint=HELLO_HINT)
        check_namespace(self.namespace)
        authorize(self.token, Role.READ, self.namespace)
        check_name(self.vm)
        console = RedisConsole(self.backend.client().store)
        chunk = await self._thread(lambda: console.tail(self.namespace, self.vm, lines=hello.lines))  # NotFound
        self.session = f"{self.token.name[:40]}-{secrets.token_hex(6)}"
        if hello.read_only:
            self.why = "read-only, as asked"
        elif not self.token.allows(Role.OPERATE, self.namespace):
            self.why = f"token {self.token.name!r} has role {self.token.role.value}; typing needs operate"
        else:
            await self._claim(console)
        await self._send({"type": "ready", **self._mode()})
        text = "".join(chunk.text.splitlines(keepends=True)[-hello.lines:]) if hello.lines else ""
        if text:
            await self._send({"type": "output", "data": text})
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._pump, chunk.last)
                tasks.start_soon(self._keep, console)
                await self._receive(console)
                tasks.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # one task's error ends the others: raise it as itself
            raise _leaf(group) from None

    async def _hello(self) -> Hello:
        with anyio.move_on_after(HELLO_TIMEOUT_S):
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            self._secret = _token_of(message.get("text"))
            self.token = await self._authenticate(self._secret)
            return cast(Hello, _parse(Hello, message, "first message"))
        raise Unauthorized(f"no first message within {HELLO_TIMEOUT_S:g} s", hint=HELLO_HINT)

    async def _authenticate(self, secret: str | None) -> Token:
        """As ``auth.TokenAuth``: nothing else is looked at before the token is known good."""
        if not self.backend.settings.api_auth:
            return ANONYMOUS
        if not secret:
            raise Unauthorized("missing API token", hint=HELLO_HINT)
        token = await lookup_async(self.backend.async_redis(), secret)
        if token is None:
            raise Unauthorized("unknown or revoked API token", hint=HELLO_HINT)
        return token

    async def _pump(self, last: str) -> None:
        """The guest's output as it comes: XREAD on the VM's console stream, on the event loop's Redis."""
        redis = self.backend.async_redis()
        stream = keys.vm_console(self.namespace, self.vm)
        while True:
            found = cast(list[tuple[str, list[tuple[str, dict[str, str]]]]] | None,
                         await redis.xread({stream: last}, count=READ_MAX, block=BLOCK_MS))
            if found and found[0][1]:
                entries = found[0][1]
                last = entries[-1][0]
                await self._send({"type": "output", "data": "".join(f.get("d", "") for _, f in entries)})

    async def _receive(self, console: RedisConsole) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            msg = cast(Message, _parse(Message, message, "message"))
            if msg.type == "input":
                await self._type(console, msg.data)
            elif msg.type == "claim":
                if self.why is None or not self.token.allows(Role.OPERATE, self.namespace):
                    await self._send({"type": "mode", **self._mode()})
                    continue
                await self._claim(console)
                await self._send({"type": "mode", **self._mode()})
            else:
                await self._release()
                self.holder, self.why = None, "released: read-only"
                await self._send({"type": "mode", **self._mode()})

    async def _type(self, console: RedisConsole, data: str) -> None:
        if not data:
            return
        if self.writer and await self._thread(lambda: console.send(self.namespace, self.vm, self.session, data)):
            return
        if self.writer:
            self._lost()
        await self._send({"type": "mode", "dropped": len(data), **self._mode()})

    async def _keep(self, console: RedisConsole) -> None:
        """Now and then: the token is still good, and the writer lease still this session's."""
        while True:
            await anyio.sleep(RENEW_S)
            try:
                await self._authenticate(self._secret)
            except Unauthorized:
                raise Unauthorized("the API token was revoked", hint=TOKEN_HINT) from None
            if self.writer and not await self._thread(lambda: console.claim(self.namespace, self.vm, self.session)):
                self._lost()
                await self._send({"type": "mode", **self._mode()})

    def _lost(self) -> None:
        self.writer, self.holder, self.why = False, None, "the writer lease was lost: read-only now"

    async def _claim(self, console: RedisConsole) -> None:
        def claim() -> tuple[bool, str | None]:
            got = console.claim(self.namespace, self.vm, self.session)
            return got, None if got else console.writer(self.namespace, self.vm)

        self.writer, self.holder = await self._thread(claim)
        self.why = None if self.writer else f"{self.holder or 'someone else'} is typing on this console"

    async def _release(self) -> None:
        if not self.writer:
            return
        self.writer = False
        console = RedisConsole(self.backend.client().store)
        try:
            await self._thread(lambda: console.release(self.namespace, self.vm, self.session))
        except (RedisConnectionError, RedisTimeoutError) as exc:  # it expires by itself
            log.warning("console socket: could not give the writer lease of %s/%s back: %s",
                        self.namespace, self.vm, exc)

    def _mode(self) -> dict[str, Any]:
        return {"writer": self.writer, "holder": self.session if self.writer else self.holder, "why": self.why}

    # -- the wire --------------------------------------------------------------------------

    @staticmethod
    async def _thread(call: Callable[[], T]) -> T:
        """The sync console store (its writer lease is a WATCH/MULTI transaction): one short call in a thread."""
        return await anyio.to_thread.run_sync(call)

    async def _send(self, data: dict[str, Any]) -> None:
        async with self._send_lock:  # the output pump and the input loop both send
            await self.ws.send_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")))

    async def _refuse(self, exc: VmorchError) -> None:
        if status_of(exc) >= 500:
            log.error("console socket of %s/%s: %s", self.namespace, self.vm, exc.message)
        try:
            await self._send({"type": "error", "error": exc.to_dict()})
        except (WebSocketDisconnect, WebSocketDisconnected, RuntimeError):
            return
        await self._close(close_code(exc), exc.message)

    async def _close(self, code: int, text: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, RuntimeError):
            await self.ws.close(code, reason(text))


def _token_of(text: object) -> str | None:
    """The first message's token, read before anything else in it is checked."""
    if not isinstance(text, str) or len(text) > 4096:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    token = data.get("token") if isinstance(data, dict) else None
    return token.strip() if isinstance(token, str) else None


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first
