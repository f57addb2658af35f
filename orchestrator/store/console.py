"""A VM's serial console in Redis: reading its output stream, and the writer lease its input needs.

The worker of the VM's host fills ``P:vm:<ns>:<name>:console`` and types what arrives in
``...:console:in`` (``worker.console``). Here is the other side, for ``vm log``, ``vm console``
and the API: read the stream (``after`` an entry id, blocking up to ``block_ms`` for more), take
the tail of it, and -- for one writer at a time -- claim the writer lease and push input, each
push refused unless the lease is still the pusher's (WATCH on the lease, then MULTI).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from pydantic import BaseModel, ConfigDict
from redis import Redis
from redis.exceptions import WatchError

from orchestrator.store import keys

#: the most one read returns, and the longest a read may block
READ_MAX = 1000
BLOCK_MAX_MS = 25_000


class ConsoleChunk(BaseModel):
    """Console output: ``entries`` as ``[id, text]`` in order, and ``last``, the id to read after next."""

    model_config = ConfigDict(frozen=True)
    entries: list[tuple[str, str]]
    last: str

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.entries)


Entries = list[tuple[str, dict[str, str]]]


def read(redis: Redis, namespace: str, vm: str, *, after: str = "0", count: int = READ_MAX,
         block_ms: int = 0) -> ConsoleChunk:
    """Entries after ``after`` ("0": from the start, "$": only what comes next), up to ``count``;
    with ``block_ms``, wait that long for the first one if there is none yet."""
    stream = keys.vm_console(namespace, vm)
    count = max(1, min(count, READ_MAX))
    if after == "$":
        newest = cast(Entries, redis.xrevrange(stream, count=1))
        after = newest[0][0] if newest else "0"
    if block_ms > 0:
        found = cast(list[tuple[str, Entries]] | None,
                     redis.xread({stream: after}, count=count, block=min(block_ms, BLOCK_MAX_MS)))
        entries = found[0][1] if found else []
    else:
        entries = cast(Entries, redis.xrange(stream, min=f"({after}" if after != "0" else "-", count=count))
    return ConsoleChunk(entries=[(i, f.get("d", "")) for i, f in entries], last=entries[-1][0] if entries else after)


def tail(redis: Redis, namespace: str, vm: str, *, lines: int) -> ConsoleChunk:
    """The entries that hold the last ``lines`` lines (the first of them may hold more)."""
    stream = keys.vm_console(namespace, vm)
    picked: Entries = []
    newlines, before = 0, "+"
    while newlines <= lines:
        batch = cast(Entries, redis.xrevrange(stream, max=before, count=100))
        if not batch:
            break
        for entry in batch:
            picked.append(entry)
            newlines += entry[1].get("d", "").count("\n")
            if newlines > lines:
                break
        before = f"({batch[-1][0]}"
    picked.reverse()
    newest = cast(Entries, redis.xrevrange(stream, count=1))
    return ConsoleChunk(entries=[(i, f.get("d", "")) for i, f in picked], last=newest[0][0] if newest else "0")


def claim_writer(redis: Redis, namespace: str, vm: str, session: str) -> bool:
    """Take the writer lease, or renew it if it is ``session``'s already; False: someone else has it."""
    lease = keys.vm_console_writer(namespace, vm)
    if redis.set(lease, session, nx=True, px=keys.CONSOLE_WRITER_TTL_MS):
        return True
    return _if_holder(redis, lease, session, lambda pipe: pipe.pexpire(lease, keys.CONSOLE_WRITER_TTL_MS))


def writer(redis: Redis, namespace: str, vm: str) -> str | None:
    """Who holds the writer lease now (a session id), if anyone."""
    return cast(str | None, redis.get(keys.vm_console_writer(namespace, vm)))


def release_writer(redis: Redis, namespace: str, vm: str, session: str) -> None:
    lease = keys.vm_console_writer(namespace, vm)
    _if_holder(redis, lease, session, lambda pipe: pipe.delete(lease))


def send(redis: Redis, namespace: str, vm: str, session: str, text: str) -> bool:
    """Queue ``text`` for the VM's console, if ``session`` holds the writer lease (False if not)."""
    lease, inbox = keys.vm_console_writer(namespace, vm), keys.vm_console_input(namespace, vm)

    def push(pipe: Any) -> None:
        pipe.rpush(inbox, text)
        pipe.pexpire(inbox, keys.CONSOLE_INPUT_TTL_MS)

    return _if_holder(redis, lease, session, push)


def _if_holder(redis: Redis, lease: str, session: str, then: Callable[[Any], object]) -> bool:
    """Run ``then(pipe)`` in a transaction only if ``lease`` holds ``session`` throughout."""
    with redis.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(lease)  # type: ignore[no-untyped-call]
            if pipe.get(lease) != session:
                return False
            pipe.multi()
            then(pipe)
            pipe.execute()
            return True
        except WatchError:
            return False
